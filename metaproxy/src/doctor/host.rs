//! The host: the kernel, cgroup v2, the pinned redirect, and what the
//! running daemon reports (its generation, the packet guard).

use std::path::Path;

use super::{Check, CheckId, Level};
use crate::{
    kernel::{cgroup, probe},
    ops::{admin::Status, admin_client},
};

pub(super) async fn host_checks(pin_dir: &Path) -> Vec<Check> {
    let mut checks = Vec::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    checks.push(kernel_check(release.trim()));
    checks.push(match cgroup::cgroup2_mount() {
        Ok(mount) => Check::new(
            "host",
            CheckId::CgroupV2,
            Level::Ok,
            mount.display().to_string(),
        ),
        Err(e) => Check::new("host", CheckId::CgroupV2, Level::Fail, e.to_string())
            .fix("boot with the unified cgroup hierarchy (systemd.unified_cgroup_hierarchy=1)"),
    });
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    checks.push(bpffs_check(&mountinfo, pin_dir));
    checks.push(layer2_check(crate::kernel::lsm::bpf_lsm()));
    checks.push(match probe::redirect_in_place(pin_dir) {
        Ok(Some(generation)) => redirect_check(
            pin_dir,
            generation,
            probe::steering_in_place(pin_dir, generation),
        ),
        Ok(None) => Check::new(
            "host",
            CheckId::Redirect,
            Level::Fail,
            format!(
                "nothing pinned in {}: containers reach the real IMDS",
                pin_dir.display()
            ),
        )
        .fix("systemctl enable --now metaproxy"),
        Err(e) => Check::new("host", CheckId::Redirect, Level::Fail, e.to_string())
            .fix("mount bpffs at /sys/fs/bpf and start metaproxy"),
    });
    checks.push(policy_routing_check(&policy_rules().await));
    checks
}

/// The redirect of `generation`, pinned in `pin_dir`, with its slot
/// steering or without.
pub(super) fn redirect_check(pin_dir: &Path, generation: u64, steering: bool) -> Check {
    if steering {
        Check::new(
            "host",
            CheckId::Redirect,
            Level::Ok,
            format!("pinned in {} (generation {generation})", pin_dir.display()),
        )
    } else {
        Check::new(
            "host",
            CheckId::Redirect,
            Level::Fail,
            format!(
                "pinned in {} (generation {generation}), but not its slot steering ({}-{generation}): every redirected connect is refused",
                pin_dir.display(),
                metaproxy_common::PROG_SK_LOOKUP
            ),
        )
        .fix("systemctl restart metaproxy")
    }
}

/// The `ip rule` entries beyond the kernel's own (local, main, default),
/// as `ip rule` would print them; one line saying why where they cannot be
/// listed.
async fn policy_rules() -> Vec<String> {
    use futures_util::TryStreamExt as _;
    use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags};
    let Ok((connection, handle, _)) = rtnetlink::new_connection() else {
        return vec!["(cannot open rtnetlink to list them)".into()];
    };
    tokio::spawn(connection);
    let mut found = Vec::new();
    for version in [rtnetlink::IpVersion::V4, rtnetlink::IpVersion::V6] {
        let mut rules = handle.rule().get(version).execute();
        loop {
            let rule = match rules.try_next().await {
                Ok(Some(rule)) => rule,
                Ok(None) => break,
                Err(e) => {
                    found.push(format!("(cannot list them: {e})"));
                    break;
                }
            };
            let mut priority = 0;
            let mut table = u32::from(rule.header.table);
            let mut parts = Vec::new();
            for attr in &rule.attributes {
                match attr {
                    RuleAttribute::Priority(p) => priority = *p,
                    RuleAttribute::Table(t) => table = *t,
                    RuleAttribute::Source(a) => {
                        parts.push(format!("from {a}/{}", rule.header.src_len))
                    }
                    RuleAttribute::Destination(a) => {
                        parts.push(format!("to {a}/{}", rule.header.dst_len))
                    }
                    RuleAttribute::Iifname(i) => parts.push(format!("iif {i}")),
                    RuleAttribute::Oifname(o) => parts.push(format!("oif {o}")),
                    RuleAttribute::FwMark(m) => parts.push(format!("fwmark {m:#x}")),
                    RuleAttribute::FwMask(m) => parts.push(format!("mask {m:#x}")),
                    RuleAttribute::UidRange(_) => parts.push("uidrange".into()),
                    RuleAttribute::IpProtocol(p) => parts.push(format!("ipproto {p:?}")),
                    RuleAttribute::L3MDev(true) => parts.push("l3mdev".into()),
                    _ => {}
                }
            }
            let invert = rule.header.flags.contains(RuleFlags::Invert);
            let default = parts.is_empty()
                && !invert
                && matches!((priority, table), (0, 255) | (32766, 254) | (32767, 253));
            if !default {
                let not = if invert { "not " } else { "" };
                let from = if parts.iter().any(|p| p.starts_with("from ")) {
                    ""
                } else {
                    "from all "
                };
                let target = match rule.header.action {
                    RuleAction::ToTable | RuleAction::Unspec => format!("lookup {table}"),
                    other => format!("{other:?}").to_lowercase(),
                };
                found.push(
                    format!("{priority}: {not}{from}{} {target}", parts.join(" "))
                        .replace("  ", " "),
                );
            }
        }
    }
    found
}

/// `ip rule` policy routing can send a packet out of an interface that
/// `ip route get` never names; the guard is on every interface of the
/// host's namespace but containers' ports, so what such a rule can still
/// do is send IMDS traffic into a container.
pub(super) fn policy_routing_check(rules: &[String]) -> Check {
    if rules.is_empty() {
        return Check::new(
            "host",
            CheckId::PolicyRouting,
            Level::Ok,
            "no ip rule beyond local, main and default",
        );
    }
    Check::new(
        "host",
        CheckId::PolicyRouting,
        Level::Warn,
        format!(
            "ip rule {}: these send some packets out of interfaces `ip route get` does not name; the packet guard is on every host interface but containers' ports, so check that no table they look up routes 169.254.169.254 into a container's port",
            rules.join("; ")
        ),
    )
    .fix("ip route get 169.254.169.254 from SOURCE iif IFACE mark MARK, for each rule's selector")
}

/// Whether this kernel can refuse jobs packet sockets (the BPF LSM runs):
/// what the layer-2 lock needs for its socket half.
pub(super) fn layer2_check(bpf_lsm: Result<(), String>) -> Check {
    match bpf_lsm {
        Ok(()) => Check::new(
            "host",
            CheckId::Layer2,
            Level::Ok,
            "the BPF LSM runs: jobs can be refused packet, AF_XDP and raw IPv6 sockets",
        ),
        Err(why) => Check::new(
            "host",
            CheckId::Layer2,
            Level::Warn,
            format!("{why}: jobs that keep NET_RAW can forge ARP and MACs on a shared bridge, and read other jobs' traffic with --network host"),
        )
        .fix("boot with bpf in lsm= (e.g. lsm=lockdown,capability,landlock,yama,bpf), or cap_drop = [\"NET_RAW\"] on every runner"),
    }
}

/// bpffs mounted where the pins go: without it nothing survives the
/// daemon, and the redirect cannot fail closed.
pub(super) fn bpffs_check(mountinfo: &str, pin_dir: &Path) -> Check {
    let mounted = mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let point = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next() == Some("bpf") && pin_dir.starts_with(point))
            .then(|| point.to_string())
    });
    match mounted {
        Some(point) => Check::new(
            "host",
            CheckId::Bpffs,
            Level::Ok,
            format!("mounted at {point}"),
        ),
        None => Check::new(
            "host",
            CheckId::Bpffs,
            Level::Fail,
            format!(
                "no bpf filesystem holds {}: the redirect cannot outlive the daemon",
                pin_dir.display()
            ),
        )
        .fix("mount -t bpf bpf /sys/fs/bpf (and add it to /etc/fstab)"),
    }
}

/// The daemon's own cgroup must be its own: every process in it bypasses
/// the redirect.
pub(super) fn shared_cgroup_check(pid: u32) -> Check {
    let dir = cgroup::cgroup2_mount().and_then(|mount| {
        let dir = cgroup::cgroup_of(&mount, &pid.to_string())?;
        let own = format!("/{}", dir.strip_prefix(&mount).unwrap_or(&dir).display());
        Ok((dir, own))
    });
    let Ok((dir, own)) = dir else {
        return Check::new(
            "host",
            CheckId::OwnCgroup,
            Level::Warn,
            format!("cannot read pid {pid}'s cgroup"),
        );
    };
    let others = cgroup::companions(&dir, pid);
    if others.is_empty() {
        return Check::new(
            "host",
            CheckId::OwnCgroup,
            Level::Ok,
            format!("{own}: the daemon's alone"),
        );
    }
    let named: Vec<String> = others
        .iter()
        .take(5)
        .map(|(pid, comm)| format!("{comm} ({pid})"))
        .collect();
    Check::new(
        "host",
        CheckId::OwnCgroup,
        Level::Fail,
        format!(
            "{own} also holds {}: they bypass the redirect and reach the real IMDS",
            named.join(", ")
        ),
    )
    .fix("run metaproxy under its systemd unit (a cgroup of its own)")
}

/// The io_uring releases whose bugs let a process bypass cgroup hooks.
pub(super) fn kernel_check(release: &str) -> Check {
    let numbers: Vec<u32> = release
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .filter_map(|n| n.parse().ok())
        .collect();
    let check = |level, found: String| Check::new("host", CheckId::Kernel, level, found);
    match numbers[..] {
        [5, 10, patch, ..] if patch <= 161 => check(
            Level::Fail,
            format!("{release}: io_uring in 5.10.0-5.10.161 can connect without the hook"),
        )
        .fix("upgrade to 5.10.162 or later, or disable io_uring (sysctl kernel.io_uring_disabled=2 where supported)"),
        [5, 11, ..] => check(
            Level::Fail,
            format!("{release}: io_uring in 5.11 can connect without the hook"),
        )
        .fix("upgrade the kernel"),
        [major, minor, ..] if (major, minor) < (5, 10) => check(
            Level::Fail,
            format!("{release}: older than 5.10, which the probe needs"),
        )
        .fix("upgrade the kernel to 5.10.162 or later"),
        [_, _, ..] => check(Level::Ok, release.to_string()),
        _ => check(Level::Warn, format!("{release:?}: not a version this check reads")),
    }
}

/// The running daemon's checks, and its status for the checks that ask
/// it more.
pub(super) async fn daemon_checks(socket: &Path) -> (Vec<Check>, Option<Status>) {
    let status = match admin_client::status(socket).await {
        Ok(status) => status,
        Err(e) => {
            return (
                vec![
                    Check::new("host", CheckId::Daemon, Level::Fail, format!("{e:#}"))
                        .fix("systemctl enable --now metaproxy"),
                ],
                None,
            )
        }
    };
    let mut checks = vec![
        Check::new(
            "host",
            CheckId::Daemon,
            Level::Ok,
            format!(
                "running (pid {}, generation {})",
                status.pid, status.generation
            ),
        ),
        shared_cgroup_check(status.pid),
    ];
    let unguarded: Vec<&str> = status
        .guard
        .routes
        .iter()
        .filter(|r| !r.guarded)
        .map(|r| r.address.as_str())
        .collect();
    checks.push(if status.guard.interfaces.is_empty() {
        Check::new(
            "host",
            CheckId::PacketGuard,
            Level::Fail,
            "on no interface: raw packets from jobs can reach IMDS",
        )
        .fix("check `metaproxy status` and the daemon's log for the route to 169.254.169.254")
    } else if !unguarded.is_empty() {
        Check::new(
            "host",
            CheckId::PacketGuard,
            Level::Fail,
            format!("routes to {} are not guarded", unguarded.join(", ")),
        )
        .fix(
            "restart metaproxy; if it persists, report the routes (`ip route get 169.254.169.254`)",
        )
    } else {
        let names: Vec<&str> = status
            .guard
            .interfaces
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        Check::new(
            "host",
            CheckId::PacketGuard,
            Level::Ok,
            format!("{} on {}", status.guard.mode, names.join(", ")),
        )
    });
    checks.push(match (&status.layer2.sockets_refused, &status.layer2.gap) {
        (true, _) => Check::new(
            "host",
            CheckId::Layer2Lock,
            Level::Ok,
            "jobs get no packet, AF_XDP or raw IPv6 socket, and no option that forges a source or passes tc egress",
        ),
        (false, gap) => Check::new(
            "host",
            CheckId::Layer2Lock,
            Level::Warn,
            format!(
                "only its setsockopt half: {}",
                gap.as_deref().unwrap_or("the running daemon has no layer-2 lock (upgrade it)")
            ),
        )
        .fix("boot with bpf in lsm=, then restart metaproxy"),
    });
    (checks, Some(status))
}
