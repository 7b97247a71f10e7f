//! The container runtime as Docker's API (bollard) describes it.
//!
//! The client is made on first use and remade after failures, so a Docker
//! daemon that starts after us (or restarts) is picked up. `DOCKER_HOST` is
//! honoured.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use bollard::{query_parameters::EventsOptionsBuilder, Docker};
use futures_util::{future::BoxFuture, stream::BoxStream, FutureExt as _, StreamExt as _};

use metaproxy_common::mountinfo;

use super::{Container, ContainerRuntime, RuntimeError, RuntimeEvent};
use crate::ids::ContainerId;

#[derive(Debug, Default)]
pub struct DockerRuntime(tokio::sync::Mutex<Option<Docker>>);

fn api(e: bollard::errors::Error) -> RuntimeError {
    RuntimeError::Api(e.to_string())
}

impl DockerRuntime {
    async fn client(&self) -> Result<Docker, RuntimeError> {
        let mut slot = self.0.lock().await;
        if let Some(docker) = slot.as_ref() {
            return Ok(docker.clone());
        }
        let docker = Docker::connect_with_defaults().map_err(api)?;
        // Speak the API version the daemon supports (older dockerd refuse
        // newer versions).
        let docker =
            match tokio::time::timeout(Duration::from_secs(2), docker.clone().negotiate_version())
                .await
            {
                Ok(Ok(negotiated)) => negotiated,
                Ok(Err(e)) => return Err(api(e)),
                Err(_) => docker,
            };
        *slot = Some(docker.clone());
        Ok(docker)
    }

    /// Forgets the client after a connection-level failure.
    async fn reset(&self) {
        *self.0.lock().await = None;
    }

    /// Inspects a container by id or name.
    async fn inspect_named(&self, name_or_id: &str) -> Result<Option<Container>, RuntimeError> {
        let fallback = ContainerId::parse(name_or_id);
        let docker = self.client().await?;
        let c = match docker.inspect_container(name_or_id, None).await {
            Ok(c) => c,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return Ok(None),
            Err(e) => {
                self.reset().await;
                return Err(api(e));
            }
        };
        let config = c.config.unwrap_or_default();
        // Without the image's ENV and labels nobody can tell who set a
        // variable or a label.
        let (image_env, image_labels) = match &c.image {
            Some(image) => {
                let config = docker
                    .inspect_image(image)
                    .await
                    .map_err(api)?
                    .config
                    .unwrap_or_default();
                (
                    config.env.unwrap_or_default(),
                    config.labels.unwrap_or_default(),
                )
            }
            None => (Vec::new(), HashMap::new()),
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
        let Some(id) = c.id.as_deref().and_then(ContainerId::parse).or(fallback) else {
            return Err(RuntimeError::Api(format!(
                "Docker gave no id for container {name_or_id}"
            )));
        };
        // Where Docker's container really runs: its init process's cgroup,
        // as the kernel reports it.
        let cgroup = c
            .state
            .as_ref()
            .and_then(|s| s.pid)
            .filter(|pid| *pid > 0)
            .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok())
            .and_then(|text| mountinfo::own_cgroup2(&text).map(str::to_owned));
        Ok(Some(Container {
            id,
            name: c
                .name
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_string(),
            labels: config.labels.unwrap_or_default(),
            env: config.env.unwrap_or_default(),
            image_env,
            image_labels,
            addresses,
            cgroup,
        }))
    }
}

impl ContainerRuntime for DockerRuntime {
    fn inspect<'a>(
        &'a self,
        id: &'a ContainerId,
    ) -> BoxFuture<'a, Result<Option<Container>, RuntimeError>> {
        self.inspect_named(id.as_str()).boxed()
    }

    fn find<'a>(
        &'a self,
        name_or_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Container>, RuntimeError>> {
        self.inspect_named(name_or_id).boxed()
    }

    fn events(
        &self,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<RuntimeEvent, RuntimeError>>, RuntimeError>>
    {
        async move {
            let docker = self.client().await?;
            // The stream connects lazily: ask once now, so a Docker that
            // went away since the client was made shows as unreachable.
            if let Err(e) = docker.ping().await {
                self.reset().await;
                return Err(api(e));
            }
            let options = EventsOptionsBuilder::new()
                .filters(&HashMap::from([
                    ("type", vec!["container"]),
                    ("event", vec!["start", "die", "destroy"]),
                ]))
                .build();
            let stream = docker.events(Some(options)).filter_map(|event| async move {
                let event = match event {
                    Ok(e) => e,
                    Err(e) => return Some(Err(api(e))),
                };
                let id = ContainerId::parse(event.actor.and_then(|a| a.id).as_deref()?)?;
                match event.action.as_deref() {
                    Some("start") => Some(Ok(RuntimeEvent::Start(id))),
                    Some("die" | "destroy") => Some(Ok(RuntimeEvent::Stop(id))),
                    _ => None,
                }
            });
            Ok(stream.boxed())
        }
        .boxed()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_must_come_from_the_containers_own_addresses() {
        let endpoints =
            || vec![Some("172.17.0.2".to_string()), Some(String::new()), None].into_iter();
        let bridged = own_addresses(Some("bridge"), endpoints());
        assert_eq!(bridged, Some(vec!["172.17.0.2".parse().unwrap()]));
        assert_eq!(own_addresses(Some("host"), endpoints()), None);
        assert_eq!(own_addresses(Some("container:abc"), endpoints()), None);
        let c = Container {
            id: ContainerId::parse(&"a".repeat(64)).unwrap(),
            name: "x".into(),
            labels: HashMap::new(),
            env: vec![],
            image_env: vec![],
            image_labels: HashMap::new(),
            addresses: bridged,
            cgroup: None,
        };
        assert!(c.owns_address("172.17.0.2".parse().unwrap()));
        assert!(c.owns_address("::ffff:172.17.0.2".parse().unwrap()));
        assert!(!c.owns_address("172.17.0.3".parse().unwrap()));
    }
}
