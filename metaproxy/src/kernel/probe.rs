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
//! maps-v2/MP_PENDING   socket cookie -> record   (shared across restarts)
//! maps-v2/MP_CONNS     4-tuple -> record         (shared across restarts;
//!                      connections on the listen port itself)
//! maps-v2/MP_SLOTS     slot port -> record, 4-tuple (shared across restarts)
//! maps-v2/MP_GUARD_DROPS  the packet guard's drop counters
//! links/<prog>-<gen>   one bpf_link per cgroup program and generation
//!                      (bpffs refuses dots in names)
//! links/mp_sk_lookup-<gen>
//!                      the slot steering on the daemon's network namespace
//! links/mp_guard_tc_if<ifindex>-<gen>
//!                      the tc guard's tcx link on one interface
//! links/mp_guard_nl_if<ifindex>_p<prio>_h<handle>-<gen>
//!                      on kernels without tcx (before 6.6): the tc guard's
//!                      program, pinned as the record of the clsact filter
//!                      that holds it (the kernel keeps such filters by
//!                      themselves)
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
//! start removes. The packet guard's links follow the same generations:
//! the old guard drops until the new one is in place.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::Duration,
};

use aya::{
    maps::{HashMap, MapData, MapError, PerCpuArray, SockMap},
    programs::{links::LinkError, SchedClassifier},
    Ebpf, EbpfLoader,
};
use metaproxy_common::{
    ConnKey, ConnRecord, GuardDrop, L2Peer, L2PeerKey, L2Refusal, L2Seen, ProbeConfig, Slot,
    GLOBAL_CONFIG, MAP_CONNS, MAP_GUARD_DROPS, MAP_L2_PEERS, MAP_L2_REFUSED, MAP_L2_SEEN,
    MAP_LISTENER, MAP_PENDING, MAP_SLOTS, PROG_BIND4, PROG_BIND6, PROG_CONNECT4, PROG_CONNECT6,
    PROG_GUARD_SKB, PROG_GUARD_TC, PROG_L2_DELIVER, PROG_L2_SOCKET, PROG_L2_SOCKOPT,
    PROG_SK_LOOKUP, PROG_SOCK_OPS, PROG_SOCK_RELEASE,
};

use crate::{
    kernel::addrs::AddrPair,
    model::{caller::Via, interface::Interface},
};

/// The compiled kernel programs, built by build.rs.
static PROBE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/metaproxy-probe"));

/// Bump when a map's key or value layout changes: new maps are created
/// beside the old ones instead of reusing incompatible pins.
/// Versioned by the maps' layout: v2 notes the 4-tuple beside a slot's
/// record.
const MAPS_DIR: &str = "maps-v2";
const LINKS_DIR: &str = "links";
/// The cgroup programs, in attach order: the layer-2 lock first, then the
/// bind guards, so the listen address is guarded before anything is
/// redirected to it, and the packet guard before the redirect.
const PROGRAMS: [&str; 8] = [
    PROG_L2_SOCKOPT,
    PROG_BIND4,
    PROG_BIND6,
    PROG_GUARD_SKB,
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_SOCK_OPS,
    PROG_SOCK_RELEASE,
];
/// The cgroup programs that only some kernels can run: the layer-2 lock's
/// LSM half needs the BPF LSM. Attached first where they can be, pinned
/// like the others, and not required of a complete generation.
const OPTIONAL_PROGRAMS: [&str; 1] = [PROG_L2_SOCKET];
/// A record older than this at accept is refused: no SDK waits this long
/// for IMDS, and an old record is one a spoofed SYN could claim.
pub const MAX_RECORD_AGE: Duration = Duration::from_secs(5);

/// How many sources of direct connections [`Probe::lookup`] keeps in mind.
const DIRECT_SOURCES: usize = 4096;
/// Pin name stems of the tc guard (see the module docs).
const TCX_PIN: &str = "mp_guard_tc_if";
const NETLINK_PIN: &str = "mp_guard_nl_if";
/// Pin name stems of the answer pin on bridges, likewise.
const DELIVER_TCX_PIN: &str = "mp_l2_deliver_if";
const DELIVER_NETLINK_PIN: &str = "mp_l2_deliver_nl_if";
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
    #[error("refusing the pin directory {path}: {why}; a local user who can write there can unlink the pins and detach the redirect (remove it and let metaproxy create it, as root, mode 0700)")]
    UnsafePinDir { path: PathBuf, why: String },
    #[error("the probe's record of this connection is {age:?} old, more than {MAX_RECORD_AGE:?}: refused (a stale record could be claimed by a spoofed SYN)")]
    Stale { age: Duration },
    #[error("guarding interface {name} (index {index})")]
    Guard {
        name: String,
        index: u32,
        source: aya::programs::ProgramError,
    },
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
    /// Interfaces that route to a guarded address: the tc guard goes on
    /// each before an older generation's is removed.
    pub guard_interfaces: Vec<Interface>,
    /// How the tc guard attaches.
    pub tc_mode: TcMode,
    /// Whether the BPF LSM is active, so the layer-2 lock's socket hook
    /// can run (see [`crate::kernel::lsm`]).
    pub bpf_lsm: Result<(), String>,
}

/// How the tc guard is attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcMode {
    /// A tcx bpf_link (kernel 6.6 and newer), pinned like the cgroup links.
    Tcx,
    /// A classic filter on the clsact qdisc (kernels 5.10 to 6.5). The
    /// qdisc holds it whether or not anyone has the program open.
    Netlink,
}

impl TcMode {
    /// tcx where the kernel has it; `METAPROXY_GUARD_TC=netlink` forces the
    /// classic filter (the tests run both).
    pub fn detect() -> Self {
        if std::env::var("METAPROXY_GUARD_TC").is_ok_and(|v| v == "netlink") {
            return Self::Netlink;
        }
        let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut parts = release
            .trim()
            .split(|c: char| !c.is_ascii_digit())
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if (major, minor) >= (6, 6) {
            Self::Tcx
        } else {
            Self::Netlink
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Netlink => "clsact",
        }
    }
}

/// Which of the two tc egress programs a pin holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TcProg {
    /// The packet guard, on interfaces that route to IMDS.
    Guard,
    /// The answer pin, on bridges the daemon answers containers through.
    Deliver,
}

impl TcProg {
    fn name(self) -> &'static str {
        match self {
            Self::Guard => PROG_GUARD_TC,
            Self::Deliver => PROG_L2_DELIVER,
        }
    }

    /// Pin name stems: (tcx, clsact).
    fn stems(self) -> (&'static str, &'static str) {
        match self {
            Self::Guard => (TCX_PIN, NETLINK_PIN),
            Self::Deliver => (DELIVER_TCX_PIN, DELIVER_NETLINK_PIN),
        }
    }
}

/// What a pin under `links/` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pin {
    /// A cgroup link of one of [`PROGRAMS`].
    Cgroup,
    /// The slot steering's link on the daemon's network namespace.
    Netns,
    /// A tc program's tcx link on an interface.
    Tcx { prog: TcProg, ifindex: u32 },
    /// A tc program, attached as a clsact filter.
    Netlink {
        prog: TcProg,
        ifindex: u32,
        priority: u16,
        handle: u32,
    },
}

/// The attached probe. Dropping it leaves the programs attached (that is
/// the point of pinning); only [`detach`] removes them.
pub struct Probe {
    /// Behind a lock: taking a record is a lookup and a delete where the
    /// kernel cannot do both in one step (before 5.14).
    conns: Mutex<HashMap<MapData, ConnKey, ConnRecord>>,
    /// The same map, for taking a record in one step.
    conns_fd: syscalls::TakeFd<ConnKey, ConnRecord>,
    pending: HashMap<MapData, u64, ConnRecord>,
    /// Behind a lock for the same reason, and for putting a record back.
    slots: Mutex<HashMap<MapData, u32, Slot>>,
    slots_fd: syscalls::TakeFd<u32, Slot>,
    /// Whether this kernel takes from a hash map in one step.
    one_step: AtomicBool,
    /// Sources whose last connection on a slot was its own (see
    /// [`Probe::lookup`]), at most [`DIRECT_SOURCES`].
    direct_sources: Mutex<std::collections::HashSet<std::net::IpAddr>>,
    /// The same map through a handle of its own, which the sweep walks
    /// without the lock the accept path takes.
    slots_walk: HashMap<MapData, u32, Slot>,
    config: ProbeConfig,
    drops: PerCpuArray<MapData, u64>,
    generation: u64,
    links_dir: PathBuf,
    tc_mode: TcMode,
    /// Interfaces this generation's tc guard is on. Also keeps the
    /// programs' fds (and aya-log's ring buffer) open.
    guard: std::sync::Mutex<(Ebpf, Vec<Interface>)>,
    l2_refused: PerCpuArray<MapData, u64>,
    l2_seen: HashMap<MapData, L2Seen, u64>,
    l2_peers: Mutex<HashMap<MapData, L2PeerKey, L2Peer>>,
    /// Bridges this generation's answer pin is on.
    deliver: Mutex<Vec<Interface>>,
    /// Whether the layer-2 lock's socket hook is attached, or why not.
    l2_socket_hook: Result<(), String>,
    /// The attached cgroup, and its id.
    cgroup: PathBuf,
    cgroup_id: u64,
    /// Every link this generation pinned, held open (see [`watchdog`]).
    /// Taken after `guard` and `deliver`.
    held: std::sync::Mutex<Vec<watchdog::Held>>,
    /// Pins restored, links attached again (see [`Probe::repair`]).
    repairs: [std::sync::atomic::AtomicU64; 2],
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
        check_pin_dir(
            &opts.pin_dir,
            &[&maps_dir, &links_dir],
            nix::unistd::geteuid().as_raw(),
        )?;

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
        let generation = old.iter().map(|(_, g, _)| *g).max().map_or(1, |g| g + 1);
        let cgroup =
            fs::File::open(&opts.cgroup).map_err(io_err("opening cgroup", &opts.cgroup))?;
        // A cgroup's id is its directory's inode number.
        let cgroup_id = std::os::unix::fs::MetadataExt::ino(
            &cgroup
                .metadata()
                .map_err(io_err("reading cgroup", &opts.cgroup))?,
        );
        let mut held = Vec::new();
        // The LSM half where the kernel runs it; a kernel that lists the BPF
        // LSM can still refuse its programs (some refuse every program that
        // needs a BPF trampoline): then it is a gap, said, not a failure.
        let l2_socket_hook = opts.bpf_lsm.clone().and_then(|()| {
            let link = attach_lsm(&mut ebpf, &cgroup).map_err(|e| {
                format!(
                    "the kernel refused the BPF LSM program ({:#})",
                    anyhow::Error::new(e)
                )
            })?;
            let path = links_dir.join(format!("{PROG_L2_SOCKET}-{generation}"));
            link.pin(&path)
                .map(drop)
                .map_err(|e| format!("pinning {}: {e}", path.display()))?;
            let id = watchdog::prog_id(&ebpf, PROG_L2_SOCKET).map_err(|e| e.to_string())?;
            held.push(
                watchdog::hold(&path, watchdog::Attached::Cgroup(PROG_L2_SOCKET), id)
                    .map_err(|e| e.to_string())?,
            );
            Ok(())
        });
        for name in PROGRAMS {
            let path = links_dir.join(format!("{name}-{generation}"));
            if name == PROG_L2_SOCKOPT {
                attach_sockopt(&mut ebpf, &cgroup, &path)?;
            } else {
                let link = attach_program(&mut ebpf, name, &cgroup)?;
                link.pin(&path).map_err(|source| ProbeError::Pin {
                    path: path.clone(),
                    source,
                })?;
            }
            let id = watchdog::prog_id(&ebpf, name)?;
            held.push(watchdog::hold(&path, watchdog::Attached::Cgroup(name), id)?);
        }
        {
            let tc = tc_program(&mut ebpf, TcProg::Guard)?;
            tc.load().map_err(|source| ProbeError::Program {
                name: PROG_GUARD_TC,
                source,
            })?;
            for iface in &opts.guard_interfaces {
                let pinned = attach_tc(
                    tc,
                    TcProg::Guard,
                    iface,
                    opts.tc_mode,
                    &links_dir,
                    generation,
                )?;
                if let Some(path) = pinned {
                    held.push(watchdog::hold(
                        &path,
                        watchdog::Attached::Tc(TcProg::Guard, iface.clone()),
                        tc_id(tc, TcProg::Guard)?,
                    )?);
                }
            }
            // Loaded now, attached to a bridge the first time the daemon
            // answers a container through it.
            tc_program(&mut ebpf, TcProg::Deliver)?
                .load()
                .map_err(|source| ProbeError::Program {
                    name: PROG_L2_DELIVER,
                    source,
                })?;
        }
        // The new generation is live: the old ones can go without a gap.
        for (path, _, pin) in old {
            unpin(&path, &pin)?;
        }
        if let Err(e) = remove_old_maps(&opts.pin_dir, MAPS_DIR) {
            tracing::warn!(error = %format!("{:#}", anyhow::Error::new(e)), "cannot unpin the maps of an older layout");
        }

        let (conns, conns_fd) = take_map_and_fd(&mut ebpf, MAP_CONNS)?;
        let pending = take_map(&mut ebpf, MAP_PENDING)?;
        let (slots, slots_fd) = take_map_and_fd(&mut ebpf, MAP_SLOTS)?;
        let slots_walk = {
            let path = maps_dir.join(MAP_SLOTS);
            let map_err = |source| ProbeError::Map {
                name: MAP_SLOTS,
                source,
            };
            let data = MapData::from_pin(&path).map_err(map_err)?;
            HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(map_err)?
        };
        let drops = {
            let map = ebpf
                .take_map(MAP_GUARD_DROPS)
                .ok_or(ProbeError::Missing(MAP_GUARD_DROPS))?;
            PerCpuArray::try_from(map).map_err(|source| ProbeError::Map {
                name: MAP_GUARD_DROPS,
                source,
            })?
        };
        let l2_refused = {
            let map = ebpf
                .take_map(MAP_L2_REFUSED)
                .ok_or(ProbeError::Missing(MAP_L2_REFUSED))?;
            PerCpuArray::try_from(map).map_err(|source| ProbeError::Map {
                name: MAP_L2_REFUSED,
                source,
            })?
        };
        let l2_seen = take_map(&mut ebpf, MAP_L2_SEEN)?;
        let l2_peers = take_map(&mut ebpf, MAP_L2_PEERS)?;
        Ok((
            Self {
                conns: Mutex::new(conns),
                conns_fd,
                pending,
                slots: Mutex::new(slots),
                slots_fd,
                one_step: AtomicBool::new(true),
                direct_sources: Mutex::default(),
                slots_walk,
                config: opts.config,
                drops,
                generation,
                links_dir,
                tc_mode: opts.tc_mode,
                guard: std::sync::Mutex::new((ebpf, opts.guard_interfaces.clone())),
                l2_refused,
                l2_seen,
                l2_peers: Mutex::new(l2_peers),
                deliver: Mutex::new(Vec::new()),
                l2_socket_hook,
                cgroup: opts.cgroup.clone(),
                cgroup_id,
                held: std::sync::Mutex::new(held),
                repairs: Default::default(),
            },
            kernel_log,
        ))
    }

    /// Puts the tc guard on `iface` too (a route to a guarded address now
    /// leaves through it). Nothing happens if it is already there.
    pub fn guard_interface(&self, iface: &Interface) -> Result<bool, ProbeError> {
        let mut guard = self.guard.lock().unwrap_or_else(|p| p.into_inner());
        let (ebpf, on) = &mut *guard;
        if on.iter().any(|i| i.index == iface.index) {
            return Ok(false);
        }
        let tc = tc_program(ebpf, TcProg::Guard)?;
        let pinned = attach_tc(
            tc,
            TcProg::Guard,
            iface,
            self.tc_mode,
            &self.links_dir,
            self.generation,
        )?;
        on.push(iface.clone());
        on.sort();
        if let Some(path) = pinned {
            let id = tc_id(tc, TcProg::Guard)?;
            self.hold(
                &path,
                watchdog::Attached::Tc(TcProg::Guard, iface.clone()),
                id,
            )?;
        }
        Ok(true)
    }

    /// Takes the tc guard off interface `index` (with tcx; a clsact filter
    /// stays where it is). `false` if it was not there.
    pub fn unguard_interface(&self, index: u32) -> Result<bool, ProbeError> {
        if self.tc_mode != TcMode::Tcx {
            return Ok(false);
        }
        let mut guard = self.guard.lock().unwrap_or_else(|p| p.into_inner());
        let (_, on) = &mut *guard;
        if !on.iter().any(|i| i.index == index) {
            return Ok(false);
        }
        on.retain(|i| i.index != index);
        // The pin and the held descriptor go: the link with them.
        self.held.lock().unwrap_or_else(|p| p.into_inner()).retain(
            |h| !matches!(&h.what, watchdog::Attached::Tc(TcProg::Guard, i) if i.index == index),
        );
        for (path, _, pin) in pinned_links(&self.links_dir)? {
            if pin
                == (Pin::Tcx {
                    prog: TcProg::Guard,
                    ifindex: index,
                })
            {
                fs::remove_file(&path).map_err(io_err("unpinning", &path))?;
            }
        }
        Ok(true)
    }

    /// Sends the daemon's answers to `addr` to `peer` (the container's MAC,
    /// out of its own port), putting the answer pin on `bridge`, the
    /// interface that routes to `addr`, first if it is not there yet.
    pub fn pin_peer(
        &self,
        addr: std::net::IpAddr,
        peer: L2Peer,
        bridge: &Interface,
    ) -> Result<(), ProbeError> {
        {
            // `guard` before `deliver`, as `forget_interfaces` takes them.
            let mut guard = self.guard.lock().unwrap_or_else(|p| p.into_inner());
            let mut on = self.deliver.lock().unwrap_or_else(|p| p.into_inner());
            if !on.iter().any(|i| i.index == bridge.index) {
                let tc = tc_program(&mut guard.0, TcProg::Deliver)?;
                let pinned = attach_tc(
                    tc,
                    TcProg::Deliver,
                    bridge,
                    self.tc_mode,
                    &self.links_dir,
                    self.generation,
                )?;
                on.push(bridge.clone());
                on.sort();
                if let Some(path) = pinned {
                    let id = tc_id(tc, TcProg::Deliver)?;
                    self.hold(
                        &path,
                        watchdog::Attached::Tc(TcProg::Deliver, bridge.clone()),
                        id,
                    )?;
                }
                tracing::info!(bridge = %bridge.name, ifindex = bridge.index, "answers to containers on this bridge go to their own ports");
            }
        }
        let key = peer_key(addr);
        self.l2_peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, peer, 0)
            .map_err(|source| ProbeError::Map {
                name: MAP_L2_PEERS,
                source,
            })
    }

    /// Forgets where answers to `addr` go (its container is gone).
    pub fn unpin_peer(&self, addr: std::net::IpAddr) {
        let _ = self
            .l2_peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&peer_key(addr));
    }

    /// The bridges the answer pin is on.
    pub fn pinned_bridges(&self) -> Vec<Interface> {
        self.deliver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Forgets interfaces that no longer exist (a deleted interface takes
    /// its filters and links with it): their pins go, so a new interface
    /// that reuses the index is guarded afresh.
    pub fn forget_interfaces(&self, exists: impl Fn(u32) -> bool) -> Result<(), ProbeError> {
        // `guard` before `deliver`, as `pin_peer` takes them.
        let mut guard = self.guard.lock().unwrap_or_else(|p| p.into_inner());
        let (_, on) = &mut *guard;
        on.retain(|i| exists(i.index));
        self.deliver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|i| exists(i.index));
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|h| match &h.what {
                watchdog::Attached::Tc(_, iface) => exists(iface.index),
                watchdog::Attached::Cgroup(_) | watchdog::Attached::Netns(_) => true,
            });
        for (path, _, pin) in pinned_links(&self.links_dir)? {
            let ifindex = match pin {
                Pin::Tcx { ifindex, .. } | Pin::Netlink { ifindex, .. } => ifindex,
                Pin::Cgroup | Pin::Netns => continue,
            };
            if !exists(ifindex) {
                fs::remove_file(&path).map_err(io_err("unpinning", &path))?;
            }
        }
        Ok(())
    }

    /// The interfaces the tc guard is on, and how it is attached.
    pub fn guarded_interfaces(&self) -> (Vec<Interface>, TcMode) {
        let guard = self.guard.lock().unwrap_or_else(|p| p.into_inner());
        (guard.1.clone(), self.tc_mode)
    }

    /// Packets the guard dropped, by kind, summed over CPUs (and over every
    /// generation since the maps were created).
    pub fn guard_drops(&self) -> Vec<(GuardDrop, u64)> {
        GuardDrop::ALL
            .iter()
            .map(|kind| {
                let n = self
                    .drops
                    .get(&(*kind as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (*kind, n)
            })
            .collect()
    }

    /// What the layer-2 lock refused, by kind, summed over CPUs.
    pub fn l2_refusals(&self) -> Vec<(L2Refusal, u64)> {
        L2Refusal::ALL
            .iter()
            .map(|kind| {
                let n = self
                    .l2_refused
                    .get(&(*kind as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (*kind, n)
            })
            .collect()
    }

    /// Each cgroup's first refusal of each kind the kernel remembers.
    pub fn l2_seen(&self) -> Vec<L2Seen> {
        self.l2_seen.keys().filter_map(Result::ok).collect()
    }

    /// Whether the layer-2 lock's socket hook (no packet, AF_XDP or raw
    /// IPv6 sockets) is attached, or why not. Its setsockopt half always is.
    pub fn l2_socket_hook(&self) -> Result<(), &str> {
        self.l2_socket_hook
            .as_ref()
            .map(|_| ())
            .map_err(String::as_str)
    }

    /// This daemon's link generation (1 for a fresh attach).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// What the kernel recorded for the accepted connection `pair`, if
    /// anything, and how it was found.
    ///
    /// A connection accepted on a slot: the record pending there. If the
    /// 4-tuple its socket noted beside it is `pair`'s, it
    /// is the connection's own and stays taken (it serves this accept and
    /// no other: a client that keeps its socket open after the daemon
    /// closed would otherwise leave a live record, which a spoofed SYN
    /// from the same address and port could claim). Else the connection
    /// was translated on its way: the record goes back to its slot, not
    /// consumed, and the connection takes it only once it has shown it
    /// comes from the record's container ([`Probe::claim`]). The record is
    /// taken before it is looked at only for a source whose last
    /// connection on a slot was its own (a job container's, the common
    /// case); any other source's is looked at first, so that nobody can
    /// keep another's slot empty for moments by sending connections to it.
    /// A connection
    /// on the listen port itself (no slot was free, or IPv6): the record
    /// its socket filed under the 4-tuple, taken. A record older than
    /// [`MAX_RECORD_AGE`] is refused.
    pub fn lookup(&self, pair: &AddrPair) -> Result<Option<(ConnRecord, Via)>, ProbeError> {
        let port = pair.server.0.port();
        if !pair.server.0.ip().to_canonical().is_ipv4() || !self.config.is_slot4(port) {
            let Some(record) = self.take_direct(pair)? else {
                return Ok(None);
            };
            if record.slot != 0 {
                // Given a slot by a connect that failed before its SYN, then
                // connected to the listen port itself: the slot goes too, or
                // a translated connection could claim the record again.
                self.claim(record.slot, |r| {
                    r.boot_ns == record.boot_ns && r.tid == record.tid
                })?;
            }
            check_age(record.boot_ns, boot_ns_now())?;
            return Ok(Some((record, Via::Direct)));
        }
        let key = u32::from(port);
        let source = pair.client.0.ip().to_canonical();
        let take_first = self.direct_from(source);
        let held = if take_first {
            // The common case, a source whose connections on slots were
            // their own: one step.
            let Some(held) = self.take(&self.slots_fd, &self.slots, MAP_SLOTS, &key)? else {
                return Ok(None);
            };
            held
        } else {
            // Looked at first: a connection that is not the record's own
            // must not empty the slot even for a moment, in which its own
            // connection could miss it.
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            match slots.get(&key, 0) {
                Ok(held) => held,
                Err(MapError::KeyNotFound) => return Ok(None),
                Err(source) => {
                    return Err(ProbeError::Map {
                        name: MAP_SLOTS,
                        source,
                    })
                }
            }
        };
        let own = pair.conn_key().is_some_and(|k| k == held.conn);
        match (take_first, own) {
            (true, true) | (false, false) => {}
            (true, false) => {
                self.put_back(key, held)?;
                self.note_source(source, false);
            }
            (false, true) => {
                // Taken now, if nobody took it meanwhile.
                if !self.claim(port, |r| {
                    r.boot_ns == held.record.boot_ns && r.tid == held.record.tid
                })? {
                    return Ok(None);
                }
                self.note_source(source, true);
            }
        }
        check_age(held.record.boot_ns, boot_ns_now())?;
        let via = if own {
            Via::Direct
        } else {
            Via::Translated { slot: port }
        };
        Ok(Some((held.record, via)))
    }

    /// Whether `source`'s last connection on a slot was its own.
    fn direct_from(&self, source: std::net::IpAddr) -> bool {
        self.direct_sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&source)
    }

    /// Notes whether `source`'s connection on a slot was its own.
    fn note_source(&self, source: std::net::IpAddr, direct: bool) {
        let mut seen = self
            .direct_sources
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !direct {
            seen.remove(&source);
            return;
        }
        if seen.len() >= DIRECT_SOURCES {
            // Bounded: forgotten all at once, each then learnt again by one
            // connection (looked at first meanwhile, which is safe).
            seen.clear();
        }
        seen.insert(source);
    }

    /// Puts `held` back on slot `key`, which was taken from it a moment
    /// ago. Should a new connect have taken the slot in that moment, it
    /// keeps it, and the connect whose record this was is refused (its
    /// client retries): a slot is never given to two.
    fn put_back(&self, key: u32, held: Slot) -> Result<(), ProbeError> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        // BPF_NOEXIST, from linux/bpf.h.
        match slots.insert(key, held, 1) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                Ok(())
            }
            Err(source) => Err(ProbeError::Map {
                name: MAP_SLOTS,
                source,
            }),
        }
    }

    /// Takes the record pending on `slot` if `is_it` says it is still the
    /// one meant; false if it is gone or another's.
    pub fn claim(
        &self,
        slot: u16,
        is_it: impl Fn(&ConnRecord) -> bool,
    ) -> Result<bool, ProbeError> {
        let key = u32::from(slot);
        let Some(held) = self.take(&self.slots_fd, &self.slots, MAP_SLOTS, &key)? else {
            return Ok(false);
        };
        if is_it(&held.record) {
            return Ok(true);
        }
        // Another connect's, which took the slot since.
        self.put_back(key, held).map(|()| false)
    }

    /// Frees the slots whose record is older than [`MAX_RECORD_AGE`]:
    /// those would be refused anyway, and a job must not hold slots by
    /// leaving connects pending (SYNs the daemon never accepted). Returns
    /// how many went.
    pub fn sweep_slots(&self) -> usize {
        let now = boot_ns_now();
        // Walked without the accept path's lock: up to SLOTS_MAX lookups.
        let stale: Vec<(u32, u64)> = self
            .slots_walk
            .iter()
            // A walk restarts when the key it stands on goes: bounded, so
            // churn cannot keep it from ending.
            .take(2 * metaproxy_common::SLOTS_MAX as usize)
            .filter_map(Result::ok)
            .filter(|(_, slot)| check_age(slot.record.boot_ns, now).is_err())
            .map(|(port, slot)| (port, slot.record.boot_ns))
            .collect();
        let mut freed = 0;
        for (port, boot_ns) in stale {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            // Still the stale one: a new connect may have taken the slot
            // since.
            if slots
                .get(&port, 0)
                .is_ok_and(|s| s.record.boot_ns == boot_ns)
                && slots.remove(&port).is_ok()
            {
                freed += 1;
            }
        }
        freed
    }

    /// Takes the record filed under `pair`'s 4-tuple.
    fn take_direct(&self, pair: &AddrPair) -> Result<Option<ConnRecord>, ProbeError> {
        let Some(key) = pair.conn_key() else {
            return Ok(None);
        };
        self.take(&self.conns_fd, &self.conns, MAP_CONNS, &key)
    }

    /// Takes `key`'s value out of the map `fd` (`name`): in one `bpf(2)`
    /// call, or, on a kernel before 5.14, as a lookup and a delete under
    /// `two_step`'s lock.
    fn take<K: aya::Pod, V: aya::Pod>(
        &self,
        fd: &syscalls::TakeFd<K, V>,
        two_step: &Mutex<HashMap<MapData, K, V>>,
        name: &'static str,
        key: &K,
    ) -> Result<Option<V>, ProbeError> {
        let map_err = |source| ProbeError::Map { name, source };
        if self.one_step.load(Ordering::Relaxed) {
            match fd.take(key) {
                Ok(value) => return Ok(value),
                Err(e) if syscalls::is_unsupported(&e) => {
                    self.one_step.store(false, Ordering::Relaxed);
                }
                Err(io_error) => {
                    return Err(map_err(MapError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_lookup_and_delete_elem",
                        io_error,
                    })))
                }
            }
        }
        let mut map = two_step.lock().unwrap_or_else(|p| p.into_inner());
        let value = match map.get(key, 0) {
            Ok(value) => value,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(source) => return Err(map_err(source)),
        };
        match map.remove(key) {
            // Gone meanwhile: the connection closed under us.
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(map_err(source)),
        }
        Ok(Some(value))
    }

    /// Steers connections to pending slots to `listener` (this daemon's
    /// IPv4 listening socket): puts it where `mp_sk_lookup` finds it and
    /// attaches that program to the daemon's own network namespace,
    /// pinned and held like the other links. Until this has run, a
    /// connect sent to a slot is refused (nobody listens there).
    pub fn steer(&self, listener: &impl std::os::fd::AsRawFd) -> Result<(), ProbeError> {
        let mut guard = self.guard.lock().unwrap_or_else(|p| p.into_inner());
        let ebpf = &mut guard.0;
        {
            let map = ebpf
                .map_mut(MAP_LISTENER)
                .ok_or(ProbeError::Missing(MAP_LISTENER))?;
            let mut listeners = SockMap::try_from(map).map_err(|source| ProbeError::Map {
                name: MAP_LISTENER,
                source,
            })?;
            listeners
                .set(0, listener, 0)
                .map_err(|source| ProbeError::Map {
                    name: MAP_LISTENER,
                    source,
                })?;
        }
        let path = self
            .links_dir
            .join(format!("{PROG_SK_LOOKUP}-{}", self.generation));
        attach_sk_lookup(ebpf, &path)?;
        let id = watchdog::prog_id(ebpf, PROG_SK_LOOKUP)?;
        drop(guard);
        self.hold(&path, watchdog::Attached::Netns(netns_ino()?), id)
    }

    /// Entries in the record maps: (pending connects, open connections,
    /// pending slots). Walks the maps, so it is for status pages, not the
    /// request path.
    pub fn map_sizes(&self) -> (usize, usize, usize) {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        (
            self.pending.keys().count(),
            conns.keys().count(),
            slots.keys().count(),
        )
    }
}

/// One of the tc classifiers in `ebpf`.
/// The kernel's id of a loaded tc program.
fn tc_id(tc: &SchedClassifier, prog: TcProg) -> Result<u32, ProbeError> {
    tc.info()
        .map(|i| i.id())
        .map_err(|source| ProbeError::Program {
            name: prog.name(),
            source,
        })
}

fn tc_program(ebpf: &mut Ebpf, prog: TcProg) -> Result<&mut SchedClassifier, ProbeError> {
    let name = prog.name();
    ebpf.program_mut(name)
        .ok_or(ProbeError::Missing(name))?
        .try_into()
        .map_err(|source| ProbeError::Program { name, source })
}

/// The answer pin's key for `addr` (an IPv4-mapped address is IPv4).
fn peer_key(addr: std::net::IpAddr) -> L2PeerKey {
    match addr.to_canonical() {
        std::net::IpAddr::V4(v4) => L2PeerKey {
            addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
            family: u32::from(metaproxy_common::AF_INET),
        },
        std::net::IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            L2PeerKey {
                addr: [word(0), word(4), word(8), word(12)],
                family: u32::from(metaproxy_common::AF_INET6),
            }
        }
    }
}

/// `CLOCK_BOOTTIME` now, as the kernel stamps records.
fn boot_ns_now() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|ts| Duration::from(ts).as_nanos() as u64)
        .unwrap_or(u64::MAX)
}

/// Refuses a record made more than [`MAX_RECORD_AGE`] before `now_ns`.
/// The inode of the daemon's network namespace, which names it in link info.
fn netns_ino() -> Result<u32, ProbeError> {
    let path = Path::new("/proc/self/ns/net");
    let meta = fs::metadata(path).map_err(io_err("reading", path))?;
    Ok(std::os::unix::fs::MetadataExt::ino(&meta) as u32)
}

fn check_age(record_ns: u64, now_ns: u64) -> Result<(), ProbeError> {
    let age = Duration::from_nanos(now_ns.saturating_sub(record_ns));
    if age > MAX_RECORD_AGE {
        return Err(ProbeError::Stale { age });
    }
    Ok(())
}

/// The name of interface `index`, if it exists.
pub fn interface_name(index: u32) -> Option<String> {
    // nix takes -1, not NULL, for libc's failure here, and hands back the
    // untouched (empty) buffer for an index that does not exist.
    nix::net::if_::if_indextoname(index)
        .ok()
        .and_then(|n| n.into_string().ok())
        .filter(|n| !n.is_empty())
}

/// A map, and a descriptor of its own for taking from it in one step.
type TakeableMap<K, V> = (HashMap<MapData, K, V>, syscalls::TakeFd<K, V>);

/// As [`take_map`], with a descriptor of the map's own for taking from it
/// in one step.
fn take_map_and_fd<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<TakeableMap<K, V>, ProbeError> {
    let map = ebpf.take_map(name).ok_or(ProbeError::Missing(name))?;
    let fd = match &map {
        aya::maps::Map::HashMap(data) | aya::maps::Map::LruHashMap(data) => {
            syscalls::TakeFd::of(data).map_err(|io_error| ProbeError::Map {
                name,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "a descriptor of the map's own",
                    io_error,
                }),
            })?
        }
        _ => return Err(ProbeError::Missing(name)),
    };
    let map = HashMap::try_from(map).map_err(|source| ProbeError::Map { name, source })?;
    Ok((map, fd))
}

fn take_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, ProbeError> {
    let map = ebpf.take_map(name).ok_or(ProbeError::Missing(name))?;
    HashMap::try_from(map).map_err(|source| ProbeError::Map { name, source })
}

mod attach;
mod pins;
mod syscalls;
mod watchdog;

use attach::{attach_lsm, attach_program, attach_sk_lookup, attach_sockopt, attach_tc};
use pins::{check_pin_dir, ensure_bpffs_dir, pinned_links, remove_old_maps, unpin};
pub use pins::{detach, guard_in_place, redirect_in_place, steering_in_place};
pub use watchdog::Repairs;

#[cfg(test)]
mod tests;
