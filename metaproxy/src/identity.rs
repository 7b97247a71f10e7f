//! Who is asking: cgroup id -> container (Docker API) -> role.
//!
//! A cgroup path names its container: `/docker/<id>` (cgroupfs),
//! `/system.slice/docker-<id>.scope` (systemd), `/<cgroup-parent>/<id>`.
//! Nested containers (docker-in-docker) have several ids in the path; the
//! outermost one that our dockerd knows wins (it owns its whole subtree, and
//! a process inside it could name a child cgroup after another container).
//! A path with no container id at all is a host process (an SSM or
//! CloudWatch agent, say). A path with ids that our dockerd does not know is
//! refused: it is some container, just not one we can vouch for.
//!
//! Results are cached per cgroup id and dropped when Docker reports the
//! container gone; unknown cgroups are resolved on demand, since a
//! container's first connect can beat Docker's `start` event.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, OnceLock},
};

use bollard::{query_parameters::EventsOptionsBuilder, Docker};
use futures_util::StreamExt as _;

use crate::{
    cgroup::CgroupPaths,
    credentials::{clean_session_name, CredKey, CredentialCache},
    policy::{Policy, RoleDecision},
};

/// gitlab-runner labels its job containers with the job id.
const GITLAB_JOB_LABEL: &str = "com.gitlab.gitlab-runner.job.id";

#[derive(Debug, Clone)]
pub enum Identity {
    Container(Arc<Container>),
    /// In no container: a host service.
    Host,
}

/// One container of our dockerd and what it may have.
#[derive(Debug)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub job_id: Option<String>,
    pub role: RoleDecision,
    /// RoleSessionName for its AssumeRole: the job, else the container.
    pub session_name: String,
    /// The container's own addresses, which its connections must come
    /// from; `None` when it shares another network namespace (`host`,
    /// `container:<id>`) and has none of its own.
    pub addresses: Option<Vec<IpAddr>>,
}

impl Container {
    /// Whether a connection from `peer` can be this container's. Catches a
    /// 4-tuple that another network namespace reused (overlapping subnets).
    pub fn owns_address(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.addresses
            .as_ref()
            .is_none_or(|own| own.contains(&peer))
    }

    /// The credential cache key, when the container has a role.
    pub fn cred_key(&self) -> Option<CredKey> {
        match &self.role {
            RoleDecision::Role(role) => Some(CredKey {
                role_arn: role.arn.clone(),
                external_id: role.external_id.clone(),
                session_name: self.session_name.clone(),
            }),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cgroup {0} no longer exists")]
    CgroupGone(u64),
    #[error("cgroup {path} names container {id}, which the Docker daemon does not know")]
    UnknownContainer { path: String, id: String },
    #[error("Docker API: {0}")]
    Docker(#[from] bollard::errors::Error),
}

/// The Docker API client, made on first use and remade after failures, so a
/// Docker daemon that starts after us (or restarts) is picked up. DOCKER_HOST
/// is honoured.
#[derive(Debug, Default)]
pub struct DockerApi(tokio::sync::Mutex<Option<Docker>>);

impl DockerApi {
    async fn get(&self) -> Result<Docker, IdentityError> {
        let mut slot = self.0.lock().await;
        if let Some(docker) = slot.as_ref() {
            return Ok(docker.clone());
        }
        let docker = Docker::connect_with_defaults()?;
        // Speak the API version the daemon supports (older dockerd refuse
        // newer versions).
        let docker = match tokio::time::timeout(
            std::time::Duration::from_secs(2),
            docker.clone().negotiate_version(),
        )
        .await
        {
            Ok(Ok(negotiated)) => negotiated,
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => docker,
        };
        *slot = Some(docker.clone());
        Ok(docker)
    }

    /// Forgets the client after a connection-level failure.
    async fn reset(&self) {
        *self.0.lock().await = None;
    }
}

/// Resolves and caches identities.
#[derive(Debug)]
pub struct Identities {
    docker: DockerApi,
    cgroups: Arc<CgroupPaths>,
    policy: Policy,
    /// The instance profile's account, once STS told us.
    account: Arc<OnceLock<String>>,
    by_cgroup: Mutex<HashMap<u64, Identity>>,
    /// Credential keys in use per container id, so a container's entries
    /// go when it does, whether or not it was ever resolved by cgroup.
    keys: Mutex<HashMap<String, CredKey>>,
}

impl Identities {
    pub fn new(
        docker: DockerApi,
        cgroups: Arc<CgroupPaths>,
        policy: Policy,
        account: Arc<OnceLock<String>>,
    ) -> Self {
        Self {
            docker,
            cgroups,
            policy,
            account,
            by_cgroup: Mutex::new(HashMap::new()),
            keys: Mutex::new(HashMap::new()),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Identity>> {
        self.by_cgroup.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets what is cached for cgroup `id`, so the next resolve asks
    /// Docker again.
    pub fn invalidate(&self, id: u64) {
        self.cache().remove(&id);
    }

    /// The identity behind cgroup `id` whose path (below the cgroup2 mount)
    /// is `path`, if already known.
    pub async fn resolve(&self, id: u64, path: Option<&str>) -> Result<Identity, IdentityError> {
        if let Some(hit) = self.cache().get(&id) {
            return Ok(hit.clone());
        }
        let path = match path {
            Some(p) => p.to_string(),
            None => {
                let cgroups = self.cgroups.clone();
                tokio::task::spawn_blocking(move || cgroups.path_of(id))
                    .await
                    .ok()
                    .flatten()
                    .ok_or(IdentityError::CgroupGone(id))?
            }
        };
        let candidates = container_ids(&path);
        let Some(outermost) = candidates.first().map(|d| d.to_string()) else {
            self.cache().insert(id, Identity::Host);
            return Ok(Identity::Host);
        };
        for candidate in &candidates {
            if let Some(container) = self.inspect(candidate).await? {
                let refused = matches!(container.role, RoleDecision::Refused(_));
                let identity = Identity::Container(Arc::new(container));
                // A refusal may be lifted (say, once the account is known):
                // decide again next time rather than remember it.
                if !refused {
                    self.cache().insert(id, identity.clone());
                }
                if let Identity::Container(c) = &identity {
                    self.remember_key(c);
                }
                return Ok(identity);
            }
        }
        Err(IdentityError::UnknownContainer {
            path: path.clone(),
            id: outermost,
        })
    }

    /// Inspects a container; `None` if our dockerd does not know it.
    async fn inspect(&self, id: &str) -> Result<Option<Container>, IdentityError> {
        let docker = self.docker.get().await?;
        let c = match docker.inspect_container(id, None).await {
            Ok(c) => c,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return Ok(None),
            Err(e) => {
                self.docker.reset().await;
                return Err(e.into());
            }
        };
        let config = c.config.unwrap_or_default();
        let env = config.env.unwrap_or_default();
        let image_env = match &c.image {
            Some(image) => match docker.inspect_image(image).await {
                Ok(img) => img.config.and_then(|c| c.env).unwrap_or_default(),
                // Without the image's ENV we cannot tell who set IAM_ROLE.
                Err(e) => return Err(e.into()),
            },
            None => Vec::new(),
        };
        let addresses = own_addresses(
            c.host_config
                .as_ref()
                .and_then(|h| h.network_mode.as_deref()),
            c.network_settings
                .and_then(|n| n.networks)
                .unwrap_or_default()
                .into_values()
                .flat_map(|e| [e.ip_address, e.global_ipv6_address]),
        );
        let full_id = c.id.unwrap_or_else(|| id.to_string());
        let name = c
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string();
        let job_id = config
            .labels
            .as_ref()
            .and_then(|l| l.get(GITLAB_JOB_LABEL))
            .cloned();
        let role = self
            .policy
            .decide(&env, &image_env, self.account.get().map(String::as_str));
        let session_name = clean_session_name(&match &job_id {
            Some(job) => format!("gitlab-job-{job}"),
            None => format!("container-{}", &full_id[..full_id.len().min(12)]),
        });
        if let RoleDecision::Refused(reason) = &role {
            tracing::warn!(container_id = %full_id, container = %name, %reason, "role refused");
        }
        Ok(Some(Container {
            id: full_id,
            name,
            job_id,
            role,
            session_name,
            addresses,
        }))
    }

    /// Follows Docker events forever: prefetches credentials for containers
    /// that start with a role, forgets containers that stop. Reconnects if
    /// the Docker API goes away.
    pub async fn follow_events(self: Arc<Self>, credentials: Arc<CredentialCache>) {
        loop {
            let options = EventsOptionsBuilder::new()
                .filters(&HashMap::from([
                    ("type", vec!["container"]),
                    ("event", vec!["start", "die", "destroy"]),
                ]))
                .build();
            let docker = match self.docker.get().await {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(error = %e, "docker events: API unavailable");
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    continue;
                }
            };
            let mut events = docker.events(Some(options));
            // Whatever happened while we were not listening (containers
            // gone, restarted) is forgotten: identities resolve afresh.
            self.cache().clear();
            while let Some(event) = events.next().await {
                let event = match event {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(error = %e, "docker events stream failed");
                        self.docker.reset().await;
                        break;
                    }
                };
                let Some(id) = event.actor.and_then(|a| a.id) else {
                    continue;
                };
                match event.action.as_deref() {
                    Some("start") => match self.inspect(&id).await {
                        Ok(Some(container)) => {
                            self.remember_key(&container);
                            if let Some(key) = container.cred_key() {
                                tracing::info!(container_id = %container.id, container = %container.name, role_arn = %key.role_arn, "prefetching credentials");
                                credentials.prefetch(key);
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(container_id = %id, error = %e, "inspect on start failed")
                        }
                    },
                    Some("die" | "destroy") => self.forget(&id, &credentials),
                    _ => {}
                }
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }

    fn remember_key(&self, container: &Container) {
        if let Some(key) = container.cred_key() {
            let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
            keys.insert(container.id.clone(), key);
        }
    }

    /// Drops everything cached about container `id`.
    fn forget(&self, id: &str, credentials: &CredentialCache) {
        self.cache()
            .retain(|_, identity| !matches!(identity, Identity::Container(c) if c.id == id));
        let key = self
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        if let Some(key) = key {
            credentials.forget(&key);
        }
    }
}

/// The addresses a container's connections come from: its endpoints' on
/// every network, or `None` for a container in another's namespace.
fn own_addresses(
    network_mode: Option<&str>,
    endpoints: impl Iterator<Item = Option<String>>,
) -> Option<Vec<IpAddr>> {
    let mode = network_mode.unwrap_or_default();
    if mode == "host" || mode.starts_with("container:") {
        return None;
    }
    Some(
        endpoints
            .flatten()
            .filter_map(|ip| ip.parse().ok())
            .collect(),
    )
}

/// Container ids named by a cgroup path, outermost first: `<id>`,
/// `docker-<id>.scope`, and any other runtime's `<prefix>-<id>[.scope]`
/// (podman's `libpod-`, containerd's `cri-containerd-`), so that a container
/// of another runtime is never mistaken for a host process.
pub fn container_ids(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|component| {
            let c = component.strip_suffix(".scope").unwrap_or(component);
            let id = c.get(c.len().checked_sub(64)?..)?;
            let whole_or_suffix = c.len() == 64 || c.as_bytes()[c.len() - 65] == b'-';
            (whole_or_suffix && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    #[test]
    fn connections_must_come_from_the_containers_own_addresses() {
        let endpoints =
            || vec![Some("172.17.0.2".to_string()), Some(String::new()), None].into_iter();
        let bridged = own_addresses(Some("bridge"), endpoints());
        assert_eq!(bridged, Some(vec!["172.17.0.2".parse().unwrap()]));
        assert_eq!(own_addresses(Some("host"), endpoints()), None);
        assert_eq!(own_addresses(Some("container:abc"), endpoints()), None);
        let c = Container {
            id: A.into(),
            name: "x".into(),
            job_id: None,
            role: RoleDecision::NoRole,
            session_name: "s".into(),
            addresses: bridged,
        };
        assert!(c.owns_address("172.17.0.2".parse().unwrap()));
        assert!(c.owns_address("::ffff:172.17.0.2".parse().unwrap()));
        assert!(!c.owns_address("172.17.0.3".parse().unwrap()));
    }

    #[test]
    fn finds_container_ids_in_every_layout() {
        assert_eq!(container_ids(&format!("/docker/{A}")), [A]);
        assert_eq!(
            container_ids(&format!("/system.slice/docker-{A}.scope")),
            [A]
        );
        assert_eq!(container_ids(&format!("/ci/runners/{A}")), [A]);
        // docker-in-docker: the outer container owns its whole subtree, so a
        // container cannot claim another's identity by naming a child cgroup
        // after it.
        assert_eq!(container_ids(&format!("/docker/{A}/docker/{B}")), [A, B]);
        assert_eq!(
            container_ids(&format!("/machine.slice/libpod-{A}.scope")),
            [A]
        );
        assert_eq!(
            container_ids(&format!("/kubepods/cri-containerd-{B}.scope")),
            [B]
        );
        assert!(container_ids(&format!("/x/not{A}")).is_empty());
        assert!(container_ids("/system.slice/amazon-ssm-agent.service").is_empty());
        assert!(container_ids("/").is_empty());
        assert!(container_ids(&format!("/docker/{}", &A[..63])).is_empty());
    }
}
