//! One judgement of what a container is given, whether a runner's
//! `[runners.docker]` asks for it or Docker runs it now: privileged, a
//! capability over the host's network or BPF, a container runtime's
//! socket. Both paths build a [`ContainerSpec`] and report its findings in
//! the same words.

use super::{Check, CheckId, Level};

/// What a container is given that can undo metaproxy's promise.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    /// The settings that make it privileged and are on: `privileged`, or
    /// `services_privileged` for a runner's service containers.
    pub privileged: Vec<&'static str>,
    /// Its added capabilities, as written (any case, with or without
    /// `CAP_`).
    pub cap_add: Vec<String>,
    /// The host paths mounted into it.
    pub host_paths: Vec<String>,
    /// Where Docker listens, when not in the usual place.
    pub daemon_socket: Option<String>,
}

/// A [`ContainerSpec`]'s findings, each ok or failed; a failure's fix says
/// what to change in the runner's `[runners.docker]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    pub privileged: Check,
    pub cap_add: Check,
    pub runtime_socket: Check,
}

impl ContainerSpec {
    pub fn judge(&self, area: &str) -> Judgement {
        let privileged = if self.privileged.is_empty() {
            Check::new(area, CheckId::Privileged, Level::Ok, "not privileged")
        } else {
            Check::new(
                area,
                CheckId::Privileged,
                Level::Fail,
                format!(
                    "{} = true: the container can detach the probe and read every job's credentials",
                    self.privileged.join(" and ")
                ),
            )
            .fix(format!(
                "set {} = false in [runners.docker]",
                self.privileged.join(" = false and ")
            ))
        };
        let added = host_reaching(self.cap_add.iter().cloned());
        let cap_add = if added.is_empty() {
            Check::new(
                area,
                CheckId::CapAdd,
                Level::Ok,
                "no capability that reaches the host's network or BPF",
            )
        } else {
            Check::new(
                area,
                CheckId::CapAdd,
                Level::Fail,
                format!(
                    "cap_add {}: the container can change its own network or BPF programs",
                    added.join(", ")
                ),
            )
            .fix("remove them from cap_add in [runners.docker]")
        };
        let mut sockets: Vec<&str> = self
            .host_paths
            .iter()
            .map(String::as_str)
            .filter(|p| holds_runtime(p, self.daemon_socket.as_deref()))
            .collect();
        sockets.dedup();
        let runtime_socket = if sockets.is_empty() {
            Check::new(area, CheckId::DockerSocket, Level::Ok, "not mounted")
        } else {
            Check::new(
                area,
                CheckId::DockerSocket,
                Level::Fail,
                format!(
                    "mounts {}: the container can start others with any labels, environment or privileges, the runner's included",
                    sockets.join(", ")
                ),
            )
            .fix("remove it from volumes in [runners.docker]; use a rootless or remote builder")
        };
        Judgement {
            privileged,
            cap_add,
            runtime_socket,
        }
    }
}

/// Whether a host path hands a container the host's container runtime:
/// its socket, a directory that holds one, or the path `daemon_socket`
/// names (where Docker listens, when not in the usual place).
pub fn holds_runtime(host_path: &str, daemon_socket: Option<&str>) -> bool {
    const SOCKETS: [&str; 3] = ["docker.sock", "containerd.sock", "buildkitd.sock"];
    const DIRS: [&str; 7] = [
        "/",
        "/var/run",
        "/run",
        "/var/run/docker",
        "/run/docker",
        "/var/run/containerd",
        "/run/containerd",
    ];
    let path = host_path.trim_end_matches('/');
    let path = if path.is_empty() { "/" } else { path };
    SOCKETS.iter().any(|s| path.ends_with(s))
        || DIRS.contains(&path)
        || daemon_socket.is_some_and(|d| d == path || d.starts_with(&format!("{path}/")))
}

/// A capability's name as Docker reads it (any case, with or without
/// `CAP_`).
pub fn capability(name: &str) -> String {
    let name = name.trim().to_ascii_uppercase();
    name.strip_prefix("CAP_")
        .map(str::to_string)
        .unwrap_or(name)
}

/// The capabilities of `caps` that reach the host's network or BPF.
fn host_reaching(caps: impl IntoIterator<Item = String>) -> Vec<String> {
    caps.into_iter()
        .map(|c| capability(&c))
        .filter(|c| ["NET_ADMIN", "SYS_ADMIN", "BPF", "ALL"].contains(&c.as_str()))
        .collect()
}
