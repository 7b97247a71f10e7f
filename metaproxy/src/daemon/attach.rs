//! Attaching: the cgroups the daemon works with, checked; the probe on the
//! target cgroup and the packet guard on the host's interfaces, in one
//! step, the guard followed as routes and links change.

use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;
use metaproxy_common::ProbeConfig;

use super::{
    host::{
        cgroup_companions, check_shared_cgroup, kernel_log_level, lacks_privilege, served_elsewhere,
    },
    tasks::Tasks,
};
use crate::{
    config::RunConfig,
    kernel::{
        addrs::{ip4_word, ip6_words},
        cgroup,
        guard::{self, GuardState, RouteTable},
        probe::{Probe, ProbeOptions, TcMode},
    },
    model::interface::Interface,
    ops::metrics::Readiness,
};

/// The cgroups the daemon works with, checked.
pub(super) struct Cgroups {
    /// The cgroup2 mount.
    pub(super) mount: PathBuf,
    /// Where the probe attaches.
    pub(super) target: PathBuf,
    /// The daemon's own cgroup, which the probe skips.
    pub(super) own: PathBuf,
    pub(super) self_cgroup_id: u64,
    /// Other processes in the daemon's cgroup.
    pub(super) companions: Vec<(u32, String)>,
}

impl Cgroups {
    pub(super) fn find(config: &RunConfig) -> anyhow::Result<Self> {
        let mount = cgroup::cgroup2_mount()?;
        let target = config.cgroup.clone().unwrap_or_else(|| mount.clone());
        cgroup::check_cgroup2_dir(&mount, &target)?;
        let own = cgroup::own_cgroup(&mount)?;
        let self_cgroup_id = cgroup::id_of(&own)?;
        // The probe skips the daemon's cgroup, so whatever else runs in it
        // reaches the real IMDS.
        let companions = cgroup_companions(&own);
        check_shared_cgroup(&own, &companions, config.allow_shared_cgroup)?;
        if own == target {
            tracing::warn!(
                cgroup = %own.display(),
                "the daemon runs in the very cgroup it intercepts: other processes in it reach the real IMDS too; run it in a cgroup of its own"
            );
        }
        Ok(Self {
            mount,
            target,
            own,
            self_cgroup_id,
            companions,
        })
    }
}

/// Whether the container-credentials endpoint can be served at `ip`: not
/// where something else already answers.
pub(super) fn servable(ip: std::net::IpAddr) -> bool {
    match served_elsewhere(ip) {
        Some(why) => {
            tracing::warn!(address = %ip, "not serving the container-credentials endpoint at {ip}: {why}; remove it from --container-credentials to silence this");
            false
        }
        None => true,
    }
}

/// Attaches the probe to the target cgroup and the packet guard to the
/// interfaces that route to IMDS, in one step, and keeps the guard there
/// as routes and links change.
pub(super) async fn attach(
    config: &RunConfig,
    cgroups: &Cgroups,
    tasks: &mut Tasks,
    readiness: &Readiness,
) -> anyhow::Result<(Arc<Probe>, Arc<GuardState>)> {
    // The packet guard goes on the interfaces that route to IMDS now, in
    // the same step as the redirect; the follower keeps it there.
    let routes_table = RouteTable::open().context("reading the routes to IMDS")?;
    let guarded = guard::guarded_addresses(&config.container_credentials);
    let routes = routes_table.lookup(&guarded).await;
    let attached = Attached {
        cgroup_id: cgroup::id_of(&cgroups.target)?,
        level: cgroups
            .target
            .strip_prefix(&cgroups.mount)
            .map_or(0, |rel| rel.components().count() as u32),
    };
    let probe = attach_probe(
        config,
        &cgroups.target,
        cgroups.self_cgroup_id,
        attached,
        // The interfaces IMDS routes through must take the guard for the
        // daemon to start; every other host interface follows at once, one
        // at a time (one can vanish between the look and the attach).
        routes.routed_interfaces(),
        tasks,
    )?;
    if let Err(e) = guard::apply(&probe, &routes) {
        tracing::warn!(error = %e, "the packet guard is not on every host interface yet; trying again as links change");
    }
    readiness.probe_attached();
    match crate::kernel::lsm::layer2_gap(probe.l2_socket_hook()) {
        None => tracing::info!("layer-2 lock attached: jobs get no packet, AF_XDP or raw IPv6 sockets, and no option that forges a source or passes tc egress"),
        Some(why) => {
            let gap = format!("jobs that keep NET_RAW can still open packet sockets (forged ARP and MACs on a shared bridge, sniffing a container's veth with --network host): {why}");
            tracing::warn!("layer-2 lock incomplete: {gap}; the setsockopt half (no PACKET_QDISC_BYPASS, AF_XDP rings, IP_HDRINCL, non-local binds) is attached");
            readiness.gap(format!("layer 2: {gap}"));
        }
    }
    let guard_state = Arc::new(GuardState::new(routes));
    {
        let (probe, state) = (probe.clone(), guard_state.clone());
        readiness.guard(Arc::new(move || {
            state.covered_by(&probe.guarded_interfaces().0)
        }));
    }
    tracing::info!(
        interfaces = %guard_state.routes().interfaces().iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(","),
        mode = probe.guarded_interfaces().1.name(),
        "packet guard attached"
    );
    tasks.spawn(
        "packet guard routes",
        guard::follow(probe.clone(), routes_table, guarded, guard_state.clone()),
    );
    Ok((probe, guard_state))
}

/// The cgroup the probe is attached to, as the packet guard checks it.
#[derive(Debug, Clone, Copy)]
struct Attached {
    cgroup_id: u64,
    level: u32,
}

fn attach_probe(
    config: &RunConfig,
    target: &std::path::Path,
    self_cgroup_id: u64,
    attached: Attached,
    guard_interfaces: Vec<Interface>,
    tasks: &mut Tasks,
) -> anyhow::Result<Arc<Probe>> {
    let (listen_ip6, listen_port6) = match config.listen6 {
        Some(l6) => (ip6_words(*l6.ip()), l6.port()),
        None => ([0; 4], 0),
    };
    let mut creds_ip4 = [0u32; 2];
    let mut creds_ip6 = [0u32; 4];
    let v4 = config
        .container_credentials
        .iter()
        .filter_map(|ip| match ip {
            std::net::IpAddr::V4(v4) => Some(ip4_word(*v4)),
            std::net::IpAddr::V6(_) => None,
        });
    for (slot, ip) in creds_ip4.iter_mut().zip(v4) {
        *slot = ip;
    }
    if let Some(std::net::IpAddr::V6(v6)) =
        config.container_credentials.iter().find(|ip| ip.is_ipv6())
    {
        creds_ip6 = ip6_words(*v6);
    }
    let opts = ProbeOptions {
        cgroup: target.to_path_buf(),
        pin_dir: config.pin_dir.clone(),
        config: ProbeConfig {
            self_cgroup_id,
            listen_ip4: ip4_word(*config.listen.ip()),
            listen_port4: config.listen.port(),
            listen_port6,
            listen_ip6,
            creds_ip4,
            creds_ip6,
            attached_cgroup_id: attached.cgroup_id,
            attached_level: attached.level,
            slot_base4: metaproxy_common::SLOT_BASE_DEFAULT,
            slot_count4: metaproxy_common::SLOT_COUNT_DEFAULT,
        },
        kernel_log_level: kernel_log_level(),
        guard_interfaces,
        tc_mode: TcMode::detect(),
        bpf_lsm: crate::kernel::lsm::bpf_lsm(),
    };
    let (probe, kernel_log) = Probe::attach(&opts).map_err(|e| {
        let hint = if lacks_privilege(&e) {
            " (not permitted: run as root, or with CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE as packaging/metaproxy.service grants)"
        } else {
            ""
        };
        anyhow::Error::new(e).context(format!("attaching to {}{hint}", target.display()))
    })?;
    if let Some(kernel_log) = kernel_log {
        tasks.spawn("kernel log", kernel_log.run());
    }
    Ok(Arc::new(probe))
}
