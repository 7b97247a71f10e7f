//! Attaching one program: to the cgroup with a pinned link, or to an
//! interface at tc egress (tcx, or a clsact filter on older kernels).

use super::*;

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
        prog.load().map_err(err)?;
        let id = prog.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
        let link = prog.take_link(id).map_err(err)?;
        FdLink::try_from(link).map_err(|source| ProbeError::Link { name, source })
    } else if name == PROG_GUARD_SKB {
        let prog: &mut CgroupSkb = program.try_into().map_err(err)?;
        prog.load().map_err(err)?;
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

/// Attaches the tc guard at egress of `iface` and pins what records it.
pub(super) fn attach_tc(
    tc: &mut SchedClassifier,
    iface: &Interface,
    mode: TcMode,
    links_dir: &Path,
    generation: u64,
) -> Result<(), ProbeError> {
    let err = |source| ProbeError::Guard {
        name: iface.name.clone(),
        index: iface.index,
        source,
    };
    match mode {
        TcMode::Tcx => {
            // Last in line: programs already there (a CNI's, say) keep their
            // place, and whatever they pass we still see.
            let id = tc
                .attach_with_options(
                    &iface.name,
                    TcAttachType::Egress,
                    TcAttachOptions::TcxOrder(LinkOrder::last()),
                )
                .map_err(err)?;
            let link = tc.take_link(id).map_err(err)?;
            let link = FdLink::try_from(link).map_err(|source| ProbeError::Link {
                name: PROG_GUARD_TC,
                source,
            })?;
            let path = links_dir.join(format!("{TCX_PIN}{}-{generation}", iface.index));
            link.pin(&path)
                .map_err(|source| ProbeError::Pin { path, source })?;
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
                "{NETLINK_PIN}{}_p{priority}_h{handle}-{generation}",
                iface.index
            ));
            tc.pin(&path)
                .map_err(|source| ProbeError::Pin { path, source })?;
        }
    }
    tracing::debug!(interface = %iface.name, ifindex = iface.index, mode = mode.name(), generation, "packet guard attached");
    Ok(())
}
