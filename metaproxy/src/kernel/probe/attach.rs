//! Attaching one program: to the cgroup with a pinned link, or to an
//! interface at tc egress (tcx, or a clsact filter on older kernels).

use std::{
    fs,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        links::FdLink,
        tc::{NlOptions, TcAttachOptions},
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
        CgroupSockopt, LinkOrder, LsmCgroup, SchedClassifier, SkLookup, SockOps, TcAttachType,
    },
    Btf, Ebpf,
};
use metaproxy_common::{
    L2_SOCKET_HOOK, PROG_GUARD_SKB, PROG_L2_SOCKET, PROG_L2_SOCKOPT, PROG_SK_LOOKUP, PROG_SOCK_OPS,
    PROG_SOCK_RELEASE,
};

use super::{io_err, syscalls, ProbeError, TcMode, TcProg};
use crate::model::interface::Interface;

/// Loads the layer-2 lock's LSM half against its hook (unless it is loaded)
/// and attaches it to
/// `cgroup` (`lsm_cgroup`: it runs only for tasks below the cgroup).
pub(super) fn attach_lsm(ebpf: &mut Ebpf, cgroup: &fs::File) -> Result<FdLink, ProbeError> {
    let name = PROG_L2_SOCKET;
    let err = |source| ProbeError::Program { name, source };
    let btf = Btf::from_sys_fs().map_err(|e| err(e.into()))?;
    let prog: &mut LsmCgroup = ebpf
        .program_mut(name)
        .ok_or(ProbeError::Missing(name))?
        .try_into()
        .map_err(err)?;
    if prog.fd().is_err() {
        prog.load(L2_SOCKET_HOOK, &btf).map_err(err)?;
    }
    let id = prog.attach(cgroup).map_err(err)?;
    Ok(prog.take_link(id).map_err(err)?.into())
}

/// Loads the layer-2 lock's setsockopt half (unless it is loaded) and
/// attaches and pins it (see
/// [`super::syscalls`] for why not through aya).
pub(super) fn attach_sockopt(
    ebpf: &mut Ebpf,
    cgroup: &fs::File,
    path: &Path,
) -> Result<(), ProbeError> {
    let name = PROG_L2_SOCKOPT;
    let err = |source| ProbeError::Program { name, source };
    let prog: &mut CgroupSockopt = ebpf
        .program_mut(name)
        .ok_or(ProbeError::Missing(name))?
        .try_into()
        .map_err(err)?;
    if prog.fd().is_err() {
        prog.load().map_err(err)?;
    }
    let fd = prog.fd().map_err(err)?;
    syscalls::attach_and_pin(fd.as_fd(), cgroup, path)
        .map_err(io_err("attaching and pinning", path))
}

/// Loads the slot steering (unless it is loaded) and attaches it to the
/// daemon's own network namespace, pinned at `path`.
pub(super) fn attach_sk_lookup(ebpf: &mut Ebpf, path: &Path) -> Result<(), ProbeError> {
    let name = PROG_SK_LOOKUP;
    let err = |source| ProbeError::Program { name, source };
    let prog: &mut SkLookup = ebpf
        .program_mut(name)
        .ok_or(ProbeError::Missing(name))?
        .try_into()
        .map_err(err)?;
    if prog.fd().is_err() {
        prog.load().map_err(err)?;
    }
    let netns_path = Path::new("/proc/self/ns/net");
    let netns = fs::File::open(netns_path).map_err(io_err("opening", netns_path))?;
    let id = prog.attach(&netns).map_err(err)?;
    let link = FdLink::from(prog.take_link(id).map_err(err)?);
    link.pin(path).map_err(|source| ProbeError::Pin {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// Loads cgroup program `name` (unless it is loaded: the watchdog attaches
/// a loaded one again) and attaches it to `cgroup`.
pub(super) fn attach_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &fs::File,
) -> Result<FdLink, ProbeError> {
    let program = ebpf.program_mut(name).ok_or(ProbeError::Missing(name))?;
    let err = |source| ProbeError::Program { name, source };
    // Cgroup bpf_links always coexist with other programs on the cgroup (the
    // kernel attaches links as multi), so "Single" only means "no flags".
    if name == PROG_SOCK_RELEASE {
        let prog: &mut CgroupSock = program.try_into().map_err(err)?;
        if prog.fd().is_err() {
            prog.load().map_err(err)?;
        }
        let id = prog.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
        let link = prog.take_link(id).map_err(err)?;
        FdLink::try_from(link).map_err(|source| ProbeError::Link { name, source })
    } else if name == PROG_GUARD_SKB {
        let prog: &mut CgroupSkb = program.try_into().map_err(err)?;
        if prog.fd().is_err() {
            prog.load().map_err(err)?;
        }
        let id = prog
            .attach(
                cgroup,
                CgroupSkbAttachType::Egress,
                CgroupAttachMode::Single,
            )
            .map_err(err)?;
        let link = prog.take_link(id).map_err(err)?;
        FdLink::try_from(link).map_err(|source| ProbeError::Link { name, source })
    } else if name == PROG_SOCK_OPS {
        let prog: &mut SockOps = program.try_into().map_err(err)?;
        if prog.fd().is_err() {
            prog.load().map_err(err)?;
        }
        let id = prog.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
        let link = prog.take_link(id).map_err(err)?;
        FdLink::try_from(link).map_err(|source| ProbeError::Link { name, source })
    } else {
        let prog: &mut CgroupSockAddr = program.try_into().map_err(err)?;
        if prog.fd().is_err() {
            prog.load().map_err(err)?;
        }
        let id = prog.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
        let link = prog.take_link(id).map_err(err)?;
        FdLink::try_from(link).map_err(|source| ProbeError::Link { name, source })
    }
}

/// Attaches a tc program at egress of `iface` and pins what records it;
/// returns the pin of its tcx link (clsact filters have no link).
pub(super) fn attach_tc(
    tc: &mut SchedClassifier,
    prog: TcProg,
    iface: &Interface,
    mode: TcMode,
    links_dir: &Path,
    generation: u64,
) -> Result<Option<PathBuf>, ProbeError> {
    let (tcx_pin, netlink_pin) = prog.stems();
    let err = |source| ProbeError::Guard {
        name: iface.name.clone(),
        index: iface.index,
        source,
    };
    match mode {
        TcMode::Tcx => {
            // The guard goes first: it only drops, so nothing after it can
            // be hurt, and a program before it that returned TCX_PASS would
            // end the chain before it ran. The answer pin goes last: it
            // redirects, and what others drop must stay dropped.
            let order = match prog {
                TcProg::Guard => LinkOrder::first(),
                TcProg::Deliver => LinkOrder::last(),
            };
            let id = tc
                .attach_with_options(
                    &iface.name,
                    TcAttachType::Egress,
                    TcAttachOptions::TcxOrder(order),
                )
                .map_err(err)?;
            let link = tc.take_link(id).map_err(err)?;
            let link = FdLink::try_from(link).map_err(|source| ProbeError::Link {
                name: prog.name(),
                source,
            })?;
            let path = links_dir.join(format!("{tcx_pin}{}-{generation}", iface.index));
            link.pin(&path).map_err(|source| ProbeError::Pin {
                path: path.clone(),
                source,
            })?;
            tracing::debug!(interface = %iface.name, ifindex = iface.index, generation, program = prog.name(), "tcx program attached");
            Ok(Some(path))
        }
        TcMode::Netlink => {
            // EEXIST when the qdisc is there already, which is fine.
            let _ = aya::programs::tc::qdisc_add_clsact(&iface.name);
            let id = tc
                .attach_with_options(
                    &iface.name,
                    TcAttachType::Egress,
                    TcAttachOptions::Netlink(NlOptions::default()),
                )
                .map_err(err)?;
            let link = tc.take_link(id).map_err(err)?;
            let (priority, handle) = (
                link.priority().map_err(err)?,
                u32::from(link.handle().map_err(err)?),
            );
            // The filter stays with the qdisc; dropping the link would
            // delete it.
            std::mem::forget(link);
            let path = links_dir.join(format!(
                "{netlink_pin}{}_p{priority}_h{handle}-{generation}",
                iface.index
            ));
            tc.pin(&path)
                .map_err(|source| ProbeError::Pin { path, source })?;
            tracing::debug!(interface = %iface.name, ifindex = iface.index, generation, program = prog.name(), "clsact filter attached");
            Ok(None)
        }
    }
}
