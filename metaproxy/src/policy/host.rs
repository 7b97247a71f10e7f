//! Host processes: in no container is not trusted. Only an allow-listed
//! cgroup reaches the real IMDS, and never a container runtime or a build
//! step.

use super::{globs, Policy};
use crate::model::caller::Caller;

impl Policy {
    /// Whether a host process (in no container) may reach the real IMDS:
    /// only from an allow-listed cgroup, and never a container runtime or
    /// a build step. Being in no container proves nothing.
    pub fn host_access(&self, caller: &Caller) -> Result<(), HostRefusal> {
        let path = caller
            .cgroup_path
            .as_deref()
            .ok_or(HostRefusal::UnknownCgroup)?;
        if is_container_runtime(&caller.comm) {
            return Err(HostRefusal::ContainerRuntime(caller.comm.clone()));
        }
        if is_build_step(path) {
            return Err(HostRefusal::BuildStep(path.to_string()));
        }
        match &self.host_allow {
            Some(set) if set.is_match(path) => Ok(()),
            _ => Err(HostRefusal::NotAllowListed(path.to_string())),
        }
    }
}

/// Whether a host process in `path` would be let through by
/// `--allow-host-cgroup` `patterns` (what `doctor` asks of the cgroups
/// where a runner runs jobs' scripts on the host). A pattern that does not
/// parse admits nothing: the daemon refuses to start with it.
pub fn allow_listed(patterns: &[String], path: &str) -> bool {
    matches!(globs::glob_set("--allow-host-cgroup", patterns), Ok(Some(set)) if set.is_match(path))
        && !is_build_step(path)
}

/// Why a host process gets no pass-through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostRefusal {
    /// dockerd fetches URLs for its API clients (`docker build` with `ADD
    /// http://169.254.169.254/...`), and jobs are API clients.
    #[error("{0} acts for containers; it gets no pass-through")]
    ContainerRuntime(String),
    /// BuildKit runs `docker build` RUN steps in cgroups of its own, with no
    /// container behind them: job code, with the host's identity.
    #[error("BuildKit build step in {0}: no pass-through")]
    BuildStep(String),
    #[error("cgroup {0} is not in --allow-host-cgroup")]
    NotAllowListed(String),
    #[error("cgroup of the caller is unknown (gone before it could be read)")]
    UnknownCgroup,
}

/// BuildKit's RUN steps: `<parent>/buildkit/<id>` (cgroupfs driver),
/// `buildkit-<id>.scope`-style units, and, with the systemd driver,
/// `docker-<25-char id>.scope`: any container runtime's scope whose id is
/// not a container's (a real container's 64-hex id makes it a container,
/// decided before host rules are asked).
pub(super) fn is_build_step(path: &str) -> bool {
    path.split('/').any(|seg| {
        seg == "buildkit"
            || seg.starts_with("buildkit-")
            || seg.starts_with("buildkit.")
            || (seg.ends_with(".scope")
                && [
                    "docker-",
                    "libpod-",
                    "cri-containerd-",
                    "crio-",
                    "containerd-",
                ]
                .iter()
                .any(|p| seg.starts_with(p)))
    })
}

/// Host processes that act on behalf of containers or Docker API clients.
pub(super) fn is_container_runtime(comm: &str) -> bool {
    matches!(
        comm,
        "dockerd" | "containerd" | "buildkitd" | "docker-proxy" | "runc" | "docker-init"
    ) || comm.starts_with("containerd-shim")
        || comm.starts_with("buildkit-runc")
}
