//! What the daemon checks and sets on its host before it serves: its
//! cgroup is its own, its file limit, who else serves the listen address,
//! the kernel log level.

use std::{net::SocketAddr, time::Duration};

use crate::kernel::cgroup;

/// How many of the daemon's cgroup companions an error names.
pub(super) const COMPANIONS_NAMED: usize = 5;

/// The other processes (pid, comm) in the daemon's own cgroup, kernel
/// threads aside (they make no connects of their own). Unreadable: none
/// (the kernel refuses nothing here to the daemon's capabilities).
pub(super) fn cgroup_companions(own: &std::path::Path) -> Vec<(u32, String)> {
    cgroup::companions(own, std::process::id())
}

/// Refuses to start while other processes share the daemon's cgroup, unless
/// the admin allowed it (then it warns).
pub(super) fn check_shared_cgroup(
    own: &std::path::Path,
    companions: &[(u32, String)],
    allowed: bool,
) -> anyhow::Result<()> {
    if companions.is_empty() {
        return Ok(());
    }
    let named = companions
        .iter()
        .take(COMPANIONS_NAMED)
        .map(|(pid, comm)| format!("{pid} {}", crate::ops::logging::Clean(comm)))
        .collect::<Vec<_>>()
        .join(", ");
    let more = companions.len().saturating_sub(COMPANIONS_NAMED);
    let named = if more > 0 {
        format!("{named} and {more} more")
    } else {
        named
    };
    if allowed {
        tracing::warn!(
            cgroup = %own.display(),
            processes = %named,
            "other processes share the daemon's cgroup (--allow-shared-cgroup): they bypass the redirect and reach the real IMDS"
        );
        return Ok(());
    }
    anyhow::bail!(
        "the daemon's cgroup {} holds {} other processes ({named}): every process in it bypasses the redirect and reaches the real IMDS. \
         Run metaproxy in a cgroup of its own (the systemd unit does; by hand, `systemd-run --scope metaproxy run ...`), \
         or pass --allow-shared-cgroup (METAPROXY_ALLOW_SHARED_CGROUP=true) to start anyway",
        own.display(),
        companions.len()
    )
}

/// Why container-credentials address `ip` is someone else's on this host,
/// if it is: assigned to an interface here, or (169.254.170.2) the ECS
/// agent's credentials port is open. Sends no packet off the host.
pub(super) fn served_elsewhere(ip: std::net::IpAddr) -> Option<String> {
    if std::net::TcpListener::bind((ip, 0)).is_ok() {
        return Some(format!(
            "{ip} is assigned to an interface on this host (another service, such as the ECS agent, serves it)"
        ));
    }
    let ecs_agent: SocketAddr = ([127, 0, 0, 1], 51679).into();
    let is_ecs_address = ip == std::net::IpAddr::from([169, 254, 170, 2]);
    if is_ecs_address
        && std::net::TcpStream::connect_timeout(&ecs_agent, Duration::from_millis(200)).is_ok()
    {
        return Some(format!(
            "the ECS agent's credentials port {ecs_agent} is open: the ECS agent serves {ip} here"
        ));
    }
    None
}

/// Whether `e` comes down to EPERM or EACCES from the kernel.
pub(super) fn lacks_privilege(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        let errno = c
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .or_else(|| c.downcast_ref::<nix::Error>().map(|e| *e as i32));
        if matches!(errno, Some(libc::EPERM | libc::EACCES)) {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Raises the soft open-files limit to the hard one: under systemd's
/// default soft limit (1024) a busy runner would make accept() fail for
/// every job, and the Docker and STS connections with it.
pub(super) fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-files limit"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
    }
}

/// The most verbose kernel log level to compile in, from the tracing filter
/// (aya-log numbering: error 1 .. trace 5).
pub(super) fn kernel_log_level() -> u8 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => 1,
        LevelFilter::WARN => 2,
        LevelFilter::INFO => 3,
        LevelFilter::DEBUG => 4,
        _ => 5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_cgroup_refuses_the_start_unless_allowed() {
        let own = std::path::Path::new("/sys/fs/cgroup/user.slice/session-3.scope");
        assert!(check_shared_cgroup(own, &[], false).is_ok());
        let shell = [(77, "bash".to_string()), (78, "sudo\x1b[2J".to_string())];
        let err = check_shared_cgroup(own, &shell, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("session-3.scope holds 2 other processes (77 bash, 78 sudo\\u{1b}[2J)"),
            "{err}"
        );
        assert!(err.contains("bypasses the redirect"), "{err}");
        assert!(err.contains("--allow-shared-cgroup"), "{err}");
        assert!(err.contains("METAPROXY_ALLOW_SHARED_CGROUP"), "{err}");
        assert!(check_shared_cgroup(own, &shell, true).is_ok());
        let many: Vec<_> = (1..=8).map(|p| (p, "sh".to_string())).collect();
        let err = check_shared_cgroup(own, &many, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("5 sh and 3 more"), "{err}");
        // This test runs with others around (cargo's harness threads are
        // threads, not processes): the listing itself works.
        let mount = cgroup::cgroup2_mount();
        if let Ok(own) = mount.and_then(|m| cgroup::own_cgroup(&m)) {
            assert!(cgroup_companions(&own)
                .iter()
                .all(|(pid, _)| *pid != std::process::id()));
        }
    }
}
