//! Who is asking: a [`Caller`]'s cgroup -> a container of one of our
//! container runtimes, or a host process.
//!
//! A cgroup path names its container and its runtime: Docker's
//! `/docker/<id>` (cgroupfs), `/system.slice/docker-<id>.scope` (systemd),
//! `/<cgroup-parent>/<id>`; Podman's `/machine.slice/libpod-<id>.scope`
//! (systemd), `/libpod_parent/libpod-<id>` (cgroupfs). Each runtime is
//! asked through its own API socket (`--docker-host`, `--podman-host`); a
//! container of a runtime we do not follow (containerd's
//! `cri-containerd-<id>`) is refused, never taken for a host process.
//! Nested containers (docker-in-docker) have several ids in the path; the
//! outermost one decides (it owns its whole subtree, and a process inside it
//! could name a child cgroup after another container). A path with no
//! container id at all is a host process.
//!
//! A name in a cgroup path is not an identity: anyone who can create
//! cgroups can call one `docker-<victim id>.scope`. So the outermost id must
//! be a container our runtime knows, and that container's init process must
//! live in the very cgroup subtree the name came from; otherwise the caller
//! is refused, never matched to an inner id or treated as a host process.
//!
//! Results are cached per cgroup id and dropped when the runtime reports the
//! container gone; unknown cgroups are resolved on demand, since a
//! container's first connect can beat the runtime's `start` event.
//! Identity publishes container start/stop as [`ContainerEvent`]s; what
//! follows from them (prefetching credentials, dropping them) is the
//! subscribers' business.
//!
//! This module only gathers facts. Which role those facts earn is
//! [`crate::policy`]'s decision.

pub mod docker;
pub mod id_token;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures_util::{future::BoxFuture, stream::BoxStream, StreamExt as _};
use tokio::sync::broadcast;

use crate::{
    model::caller::Caller,
    model::{
        container::{Container, ContainerEvent},
        gitlab,
        id_token::TokenState,
        ids::{CgroupId, ContainerId},
    },
    ops::metrics::DockerMetrics,
};

/// Bound on cached cgroups (host cgroups, such as one per BuildKit step, are
/// cached too); past it the cache starts afresh.
const MAX_CACHED: usize = 16_384;

/// Which container runtime a cgroup path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuntimeKind {
    Docker,
    Podman,
}

impl RuntimeKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Docker => "Docker",
            Self::Podman => "Podman",
        }
    }

    /// The runtime a cgroup path component (an id with its prefix and
    /// `.scope` already seen) belongs to: `libpod-` is Podman's; a bare id
    /// and `docker-` are Docker's; any other prefix is no runtime of ours.
    fn of_prefix(prefix: &str) -> Option<Self> {
        match prefix {
            "" | "docker-" => Some(Self::Docker),
            "libpod-" => Some(Self::Podman),
            _ => None,
        }
    }
}

/// The runtimes metaproxy follows, each through its own API socket.
pub type Runtimes = Vec<(RuntimeKind, Arc<dyn ContainerRuntime>)>;

/// What a cgroup turned out to be.
#[derive(Debug, Clone)]
pub enum Identity {
    Container(Arc<Container>),
    /// In no container: a host service.
    Host,
}

/// What the runtime reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeEvent {
    Start(ContainerId),
    Stop(ContainerId),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("Docker API: {0}")]
    Api(String),
    /// A name both runtimes know: an admin's lookup must not pick one.
    #[error("{0:?} names a container of more than one runtime (Docker and Podman); give the id of one that only one of them knows")]
    Ambiguous(String),
}

/// The container runtime (Docker, through bollard; a table in tests).
pub trait ContainerRuntime: Send + Sync + 'static {
    /// The container `id`, or `None` if the runtime does not know it.
    fn inspect<'a>(
        &'a self,
        id: &'a ContainerId,
    ) -> BoxFuture<'a, Result<Option<Container>, RuntimeError>>;

    /// A container by name or id, for admins (`metaproxy policy explain`).
    fn find<'a>(
        &'a self,
        name_or_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Container>, RuntimeError>> {
        match ContainerId::parse(name_or_id) {
            Some(id) => Box::pin(async move { self.inspect(&id).await }),
            None => Box::pin(async { Ok(None) }),
        }
    }

    /// Container start and stop events, from now on.
    fn events(
        &self,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<RuntimeEvent, RuntimeError>>, RuntimeError>>;
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    #[error("cgroup {0} no longer exists")]
    CgroupGone(CgroupId),
    #[error("cgroup {path} names container {id}, which the Docker daemon does not know")]
    UnknownContainer { path: String, id: String },
    #[error("cgroup {path} names container {id} of a container runtime metaproxy does not follow (it follows {followed})")]
    UnknownRuntime {
        path: String,
        id: String,
        followed: String,
    },
    #[error("cgroup {path} is named after container {id}, which does not run there")]
    NotItsCgroup { path: String, id: String },
    #[error("client address {0} is not the container's")]
    ForeignAddress(IpAddr),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// Resolves and caches identities; publishes container events.
pub struct Identities {
    runtimes: Runtimes,
    by_cgroup: Mutex<HashMap<CgroupId, Identity>>,
    events: broadcast::Sender<ContainerEvent>,
    metrics: DockerMetrics,
    /// Whether each runtime's event stream is connected.
    reachable: Vec<AtomicBool>,
    /// Verifies jobs' GitLab ID tokens (`--oidc-issuer`).
    id_tokens: Option<Arc<id_token::IdTokens>>,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities")
            .field("cached", &self.cache().len())
            .finish_non_exhaustive()
    }
}

impl Identities {
    /// Identities of Docker's containers alone.
    pub fn new(runtime: Arc<dyn ContainerRuntime>) -> Self {
        Self::of(vec![(RuntimeKind::Docker, runtime)])
    }

    /// Identities of the containers of every runtime in `runtimes`.
    pub fn of(runtimes: Runtimes) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            reachable: runtimes.iter().map(|_| AtomicBool::new(false)).collect(),
            runtimes,
            by_cgroup: Mutex::new(HashMap::new()),
            events,
            metrics: DockerMetrics::default(),
            id_tokens: None,
        }
    }

    /// Verify jobs' ID tokens with `tokens`.
    pub fn with_id_tokens(mut self, tokens: Arc<id_token::IdTokens>) -> Self {
        self.id_tokens = Some(tokens);
        self
    }

    pub fn id_tokens(&self) -> Option<&Arc<id_token::IdTokens>> {
        self.id_tokens.as_ref()
    }

    /// What container `c`'s ID token comes to now: absent unless
    /// `--oidc-issuer` is set, the runner asked for a role and the
    /// container carries a token (none is verified for nothing).
    pub async fn id_token(&self, c: &Container) -> TokenState {
        match &self.id_tokens {
            Some(tokens) if gitlab::asks_for_role(c) => tokens.check(c).await,
            _ => TokenState::Absent,
        }
    }

    pub fn metrics(&self) -> &DockerMetrics {
        &self.metrics
    }

    /// Whether every runtime answers: its event stream is connected.
    pub fn reachable(&self) -> bool {
        self.unreachable().is_none()
    }

    /// The first runtime whose event stream is not connected.
    pub fn unreachable(&self) -> Option<RuntimeKind> {
        self.runtimes
            .iter()
            .zip(&self.reachable)
            .find(|(_, up)| !up.load(Ordering::Relaxed))
            .map(|((kind, _), _)| *kind)
    }

    /// How many cgroups' identities are cached.
    pub fn cached(&self) -> usize {
        self.cache().len()
    }

    /// A container by name or id (admins' lookups; never cached). Every
    /// runtime is asked: a name two runtimes know is refused as ambiguous
    /// rather than answered from whichever was asked first.
    pub async fn find(&self, name_or_id: &str) -> Result<Option<Container>, RuntimeError> {
        let mut found: Option<Container> = None;
        for (_, runtime) in &self.runtimes {
            let result = runtime.find(name_or_id).await;
            self.metrics.call("inspect", result.is_ok());
            if let Some(this) = result? {
                if found.is_some() {
                    return Err(RuntimeError::Ambiguous(name_or_id.to_string()));
                }
                found = Some(this);
            }
        }
        Ok(found)
    }

    /// `inspect` on each runtime of `kind` until one knows `id`, counted.
    async fn inspect(
        &self,
        kind: RuntimeKind,
        id: &ContainerId,
    ) -> Result<Option<Container>, RuntimeError> {
        for (_, runtime) in self.runtimes.iter().filter(|(k, _)| *k == kind) {
            let result = runtime.inspect(id).await;
            self.metrics.call("inspect", result.is_ok());
            if let Some(found) = result? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// The runtimes followed, by name (for errors).
    fn followed(&self) -> String {
        let mut names: Vec<&str> = self.runtimes.iter().map(|(k, _)| k.name()).collect();
        names.dedup();
        names.join(" and ")
    }

    /// Container start/stop events, for those who act on them.
    pub fn subscribe(&self) -> broadcast::Receiver<ContainerEvent> {
        self.events.subscribe()
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<CgroupId, Identity>> {
        self.by_cgroup.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Who `caller` is. A container's connection must come from one of its
    /// own addresses; if it does not, the runtime is asked again once (its
    /// networks may have changed since we cached it).
    pub async fn identify(&self, caller: &Caller) -> Result<Identity, IdentityError> {
        // A translated connection from a foreign address is most likely
        // another job guessing a slot: it does not get to make the daemon
        // ask the runtime again, connection after connection.
        let tries: &[bool] = match caller.via {
            crate::model::caller::Via::Direct => &[false, true],
            crate::model::caller::Via::Translated { .. } => &[false],
            // Comes from the relay's host address, not the container's:
            // the kernel has shown the relay serves the network namespace
            // the record's process connected from, which stands for it.
            crate::model::caller::Via::Relayed { .. } => return self.resolve(caller).await,
        };
        for &fresh in tries {
            if fresh {
                self.cache().remove(&caller.cgroup);
            }
            match self.resolve(caller).await? {
                Identity::Container(c) if !c.owns_address(caller.peer.ip()) => continue,
                identity => return Ok(identity),
            }
        }
        Err(IdentityError::ForeignAddress(
            caller.peer.ip().to_canonical(),
        ))
    }

    async fn resolve(&self, caller: &Caller) -> Result<Identity, IdentityError> {
        if let Some(hit) = self.cache().get(&caller.cgroup) {
            return Ok(hit.clone());
        }
        let path = caller
            .cgroup_path
            .as_deref()
            .ok_or(IdentityError::CgroupGone(caller.cgroup))?;
        let Some((id, root, kind)) = container_roots(path).into_iter().next() else {
            self.remember(caller.cgroup, Identity::Host);
            return Ok(Identity::Host);
        };
        let followed = kind.filter(|k| self.runtimes.iter().any(|(r, _)| r == k));
        let Some(kind) = followed else {
            return Err(IdentityError::UnknownRuntime {
                path: path.to_string(),
                id: id.to_string(),
                followed: self.followed(),
            });
        };
        let Some(container) = self.inspect(kind, &id).await? else {
            return Err(IdentityError::UnknownContainer {
                path: path.to_string(),
                id: id.to_string(),
            });
        };
        // The container's own init must live in the subtree the name came
        // from: a look-alike cgroup elsewhere borrows nothing.
        let lives_there = container
            .cgroup
            .as_deref()
            .is_some_and(|init| within(init, root));
        if !lives_there {
            return Err(IdentityError::NotItsCgroup {
                path: path.to_string(),
                id: id.to_string(),
            });
        }
        let identity = Identity::Container(Arc::new(container));
        self.remember(caller.cgroup, identity.clone());
        Ok(identity)
    }

    fn remember(&self, cgroup: CgroupId, identity: Identity) {
        let mut cache = self.cache();
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(cgroup, identity);
    }

    /// Drops everything cached about container `id`.
    fn forget(&self, id: &ContainerId) {
        self.cache()
            .retain(|_, identity| !matches!(identity, Identity::Container(c) if c.id == *id));
    }

    /// Follows every runtime's events forever (see [`Self::follow_runtime`]).
    /// Run it as a task.
    pub async fn follow_events(self: Arc<Self>) {
        let followers = (0..self.runtimes.len()).map(|n| self.clone().follow_runtime(n));
        futures_util::future::join_all(followers).await;
    }

    /// Follows runtime `n`'s events forever: publishes containers that
    /// start, forgets and publishes containers that stop. Reconnects if the
    /// runtime goes away.
    async fn follow_runtime(self: Arc<Self>, n: usize) {
        let (kind, runtime) = self.runtimes[n].clone();
        loop {
            let connected = runtime.events().await;
            self.metrics.call("events", connected.is_ok());
            self.reachable[n].store(connected.is_ok(), Ordering::Relaxed);
            let mut events = match connected {
                Ok(events) => events,
                Err(e) => {
                    tracing::debug!(runtime = kind.name(), error = %e, "container events: runtime unavailable");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            };
            // Whatever happened while we were not listening (containers
            // gone, restarted) is forgotten: identities resolve afresh.
            self.cache().clear();
            while let Some(event) = events.next().await {
                match event {
                    Ok(RuntimeEvent::Start(id)) => match self.inspect(kind, &id).await {
                        Ok(Some(container)) => {
                            let _ = self
                                .events
                                .send(ContainerEvent::Started(Arc::new(container)));
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(container_id = %id, error = %e, "inspect on start failed")
                        }
                    },
                    Ok(RuntimeEvent::Stop(id)) => {
                        self.forget(&id);
                        let _ = self.events.send(ContainerEvent::Gone(id));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "container events stream failed");
                        self.metrics.error("events");
                        break;
                    }
                }
            }
            self.reachable[n].store(false, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Whether cgroup `path` is `root` or below it.
fn within(path: &str, root: &str) -> bool {
    path == root
        || path
            .strip_prefix(root)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Container ids named by a cgroup path, outermost first, each with the
/// path up to and including the component that names it and the runtime
/// the component's shape names: `<id>` and `docker-<id>.scope` (Docker),
/// `libpod-<id>[.scope]` (Podman), and any other runtime's
/// `<prefix>-<id>[.scope]` (containerd's `cri-containerd-`: `None`), so
/// that a container of another runtime is never mistaken for a host
/// process.
///
/// A Podman pod under the cgroupfs manager is a bare id below
/// `libpod_parent`, with its containers' `libpod-<id>` below it: the pod
/// is no container, and is left out when a container follows it (alone,
/// it reads as Docker's, which knows no such container: refused).
pub fn container_roots(path: &str) -> Vec<(ContainerId, &str, Option<RuntimeKind>)> {
    let mut end = 0;
    // `/libpod_parent/<pod id>`: the pod's place, and only there.
    let pod_at_top = path.starts_with("/libpod_parent/");
    let mut pod = None;
    let mut roots = Vec::new();
    for (n, component) in path.split('/').enumerate() {
        end += component.len() + 1;
        let c = component.strip_suffix(".scope").unwrap_or(component);
        let Some(id) = c.len().checked_sub(64).and_then(|at| c.get(at..)) else {
            continue;
        };
        let whole_or_suffix = c.len() == 64 || c.as_bytes()[c.len() - 65] == b'-';
        let Some(id) = whole_or_suffix.then(|| ContainerId::parse(id)).flatten() else {
            continue;
        };
        if pod_at_top && n == 2 && c.len() == 64 {
            pod = Some(roots.len());
        }
        let kind = RuntimeKind::of_prefix(&c[..c.len() - 64]);
        roots.push((id, &path[..(end - 1).min(path.len())], kind));
    }
    if let Some(at) = pod.filter(|&at| at + 1 < roots.len()) {
        roots.remove(at);
    }
    roots
}

/// Whether the cgroup at `path` is a nested one of container `c`: below
/// the subtree that names `c` (`root`) and not its init's own (Docker-in-
/// Docker's inner containers and build steps; not the container's own
/// processes, whose connects nothing translates).
pub fn is_nested(path: &str, root: &str, c: &Container) -> bool {
    path != root && within(path, root) && Some(path) != c.cgroup.as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    fn ids(path: &str) -> Vec<String> {
        container_roots(path)
            .into_iter()
            .map(|(id, ..)| id.to_string())
            .collect()
    }

    #[test]
    fn finds_container_ids_in_every_layout() {
        assert_eq!(ids(&format!("/docker/{A}")), [A]);
        assert_eq!(ids(&format!("/system.slice/docker-{A}.scope")), [A]);
        assert_eq!(ids(&format!("/ci/runners/{A}")), [A]);
        // docker-in-docker: the outer container owns its whole subtree.
        assert_eq!(ids(&format!("/docker/{A}/docker/{B}")), [A, B]);
        assert_eq!(ids(&format!("/machine.slice/libpod-{A}.scope")), [A]);
        assert_eq!(ids(&format!("/kubepods/cri-containerd-{B}.scope")), [B]);
        assert!(ids(&format!("/x/not{A}")).is_empty());
        assert!(ids("/system.slice/amazon-ssm-agent.service").is_empty());
        assert!(ids("/").is_empty());
        assert!(ids(&format!("/docker/{}", &A[..63])).is_empty());
    }

    #[test]
    fn the_shape_of_a_component_names_its_runtime() {
        let kinds = |path: &str| -> Vec<Option<RuntimeKind>> {
            container_roots(path).into_iter().map(|(.., k)| k).collect()
        };
        let (docker, podman) = (Some(RuntimeKind::Docker), Some(RuntimeKind::Podman));
        assert_eq!(kinds(&format!("/docker/{A}")), [docker]);
        assert_eq!(kinds(&format!("/system.slice/docker-{A}.scope")), [docker]);
        assert_eq!(kinds(&format!("/machine.slice/libpod-{A}.scope")), [podman]);
        assert_eq!(kinds(&format!("/libpod_parent/libpod-{A}")), [podman]);
        // A pod under cgroupfs is no container: its container is the
        // outermost one.
        assert_eq!(kinds(&format!("/libpod_parent/{B}/libpod-{A}")), [podman]);
        assert_eq!(ids(&format!("/libpod_parent/{B}/libpod-{A}")), [A]);
        // Alone, the pod's id is looked for as Docker's (and not found).
        assert_eq!(kinds(&format!("/libpod_parent/{B}")), [docker]);
        // Anywhere else a bare id is Docker's.
        assert_eq!(kinds(&format!("/ci/{B}/libpod-{A}")), [docker, podman]);
        // Only at the top: deeper, a bare id is a container's.
        assert_eq!(
            kinds(&format!("/docker/{B}/libpod_parent/{A}/libpod-{A}")),
            [docker, docker, podman]
        );
        assert_eq!(
            kinds(&format!("/ci/libpod-{A}/docker/{B}")),
            [podman, docker]
        );
        assert_eq!(
            kinds(&format!("/kubepods/cri-containerd-{B}.scope")),
            [None]
        );
        // A look-alike prefix is no runtime's.
        assert_eq!(kinds(&format!("/x/mylibpod-{A}")), [None]);
    }

    #[test]
    fn each_id_comes_with_the_subtree_that_names_it() {
        let path = format!("/ci/docker-{A}.scope/docker/{B}");
        let roots = container_roots(&path);
        assert_eq!(roots[0].1, format!("/ci/docker-{A}.scope"));
        assert_eq!(roots[1].1, path);
        assert!(within(&format!("/ci/docker-{A}.scope/init"), roots[0].1));
        assert!(!within(&format!("/ci/docker-{A}.scopex"), roots[0].1));
    }

    #[test]
    fn debug_never_prints_the_environment() {
        let c = Container {
            id: ContainerId::parse(A).unwrap(),
            name: "job".into(),
            labels: HashMap::new(),
            env: vec!["CI_JOB_TOKEN=glcbt-secret".into()],
            image_env: vec![],
            image_labels: HashMap::new(),
            addresses: None,
            cgroup: None,
            wire: Default::default(),
        };
        let printed = format!("{c:?}");
        assert!(!printed.contains("glcbt-secret"), "{printed}");
    }
}
