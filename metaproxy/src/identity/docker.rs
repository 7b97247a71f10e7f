//! The container runtime as Docker's API (bollard) describes it.
//!
//! The client is made on first use and remade after failures, so a Docker
//! daemon that starts after us (or restarts) is picked up. `DOCKER_HOST` is
//! honoured.
//!
//! Every call has [`DOCKER_TIMEOUT`] (bollard's own is 120 s): a dockerd
//! that hangs makes a request fail as "Docker unavailable" in seconds, never
//! holds it (and its connection) for minutes.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use bollard::{query_parameters::EventsOptionsBuilder, Docker};
use futures_util::{future::BoxFuture, stream::BoxStream, FutureExt as _, StreamExt as _};

use metaproxy_common::mountinfo;

use super::{Container, ContainerRuntime, RuntimeError, RuntimeEvent, RuntimeKind};
use crate::model::{
    container::{parse_mac, Wire},
    ids::ContainerId,
};

/// How long one Docker API call (an inspect with its image, a ping, the
/// version negotiation) may take.
pub const DOCKER_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug)]
pub struct DockerRuntime {
    client: tokio::sync::Mutex<Option<Docker>>,
    /// Where dockerd listens: `None` for bollard's defaults (`DOCKER_HOST`).
    socket: Option<std::path::PathBuf>,
    timeout: Duration,
    /// Who answers at the socket: Docker, or Podman through its
    /// Docker-compatible API.
    kind: RuntimeKind,
    /// Its name in errors: `dockerd` or `podman`.
    daemon: &'static str,
}

impl Default for DockerRuntime {
    fn default() -> Self {
        Self {
            client: tokio::sync::Mutex::new(None),
            socket: None,
            timeout: DOCKER_TIMEOUT,
            kind: RuntimeKind::Docker,
            daemon: "dockerd",
        }
    }
}

fn api(e: bollard::errors::Error) -> RuntimeError {
    RuntimeError::Api(e.to_string())
}

impl DockerRuntime {
    /// A runtime talking to the dockerd at Unix socket `socket`, each call
    /// given `timeout`.
    pub fn at(socket: impl Into<std::path::PathBuf>, timeout: Duration) -> Self {
        Self {
            client: tokio::sync::Mutex::new(None),
            socket: Some(socket.into()),
            timeout,
            kind: RuntimeKind::Docker,
            daemon: "dockerd",
        }
    }

    /// The same, for the runtime `kind` (Podman through its
    /// Docker-compatible API).
    pub fn named(mut self, kind: RuntimeKind) -> Self {
        self.kind = kind;
        self.daemon = match kind {
            RuntimeKind::Docker => "dockerd",
            RuntimeKind::Podman => "podman",
        };
        self
    }

    /// `call`, or a clear error once the timeout has passed.
    async fn timed<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T, RuntimeError>>,
    ) -> Result<T, RuntimeError> {
        // A statement of its own: the call (which may hold the client's
        // lock) is dropped before `reset` takes that lock.
        let result = tokio::time::timeout(self.timeout, call).await;
        match result {
            Ok(result) => result,
            Err(_) => {
                // The connection may be wedged: make a new one next time.
                self.reset().await;
                Err(RuntimeError::Api(format!(
                    "{} did not answer {what} within {} ms",
                    self.daemon,
                    self.timeout.as_millis()
                )))
            }
        }
    }

    async fn client(&self) -> Result<Docker, RuntimeError> {
        let mut slot = self.client.lock().await;
        if let Some(docker) = slot.as_ref() {
            return Ok(docker.clone());
        }
        // bollard's own timeout (whole seconds, for the response headers
        // only) backs ours up.
        let secs = self.timeout.as_secs().max(1);
        let docker = match &self.socket {
            None => {
                Docker::connect_with_defaults().map(|d| d.with_timeout(Duration::from_secs(secs)))
            }
            Some(path) => Docker::connect_with_unix(
                &path.to_string_lossy(),
                secs,
                bollard::API_DEFAULT_VERSION,
            ),
        }
        .map_err(api)?;
        // Speak the API version the daemon supports (older dockerd refuse
        // newer versions).
        let docker =
            match tokio::time::timeout(self.timeout, docker.clone().negotiate_version()).await {
                Ok(Ok(negotiated)) => negotiated,
                Ok(Err(e)) => return Err(api(e)),
                Err(_) => {
                    return Err(RuntimeError::Api(format!(
                        "{} did not answer the version negotiation within {} ms",
                        self.daemon,
                        self.timeout.as_millis()
                    )))
                }
            };
        *slot = Some(docker.clone());
        Ok(docker)
    }

    /// Forgets the client after a connection-level failure.
    async fn reset(&self) {
        *self.client.lock().await = None;
    }

    /// Inspects a container by id or name, within the timeout.
    async fn inspect_named(&self, name_or_id: &str) -> Result<Option<Container>, RuntimeError> {
        let what = format!("an inspect of {}", crate::ops::logging::Clean(name_or_id));
        self.timed(&what, self.inspect_untimed(name_or_id)).await
    }

    async fn inspect_untimed(&self, name_or_id: &str) -> Result<Option<Container>, RuntimeError> {
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
        let endpoints: Vec<_> = c
            .network_settings
            .and_then(|n| n.networks)
            .unwrap_or_default()
            .into_values()
            .collect();
        let addresses = own_addresses(
            c.host_config
                .as_ref()
                .and_then(|h| h.network_mode.as_deref()),
            endpoints
                .iter()
                .flat_map(|e| [e.ip_address.clone(), e.global_ipv6_address.clone()]),
        );
        let macs = endpoints
            .iter()
            .filter_map(|e| Some((e, parse_mac(e.mac_address.as_deref()?)?)))
            .flat_map(|(e, mac)| {
                [e.ip_address.as_deref(), e.global_ipv6_address.as_deref()]
                    .into_iter()
                    .flatten()
                    .filter_map(|ip| ip.parse::<IpAddr>().ok())
                    .map(move |ip| (ip, mac))
            })
            .collect();
        let pid = c
            .state
            .as_ref()
            .and_then(|s| s.pid)
            .filter(|pid| *pid > 0)
            .and_then(|pid| u32::try_from(pid).ok());
        let Some(id) = c.id.as_deref().and_then(ContainerId::parse).or(fallback) else {
            return Err(RuntimeError::Api(format!(
                "Docker gave no id for container {name_or_id}"
            )));
        };
        // Where Docker's container really runs: its init process's cgroup,
        // as the kernel reports it.
        let cgroup = pid
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
            wire: Wire { pid, macs },
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
            let docker = self.timed("a ping", self.client()).await?;
            // The stream connects lazily: ask once now, so a Docker that
            // went away since the client was made shows as unreachable.
            let ping = async { docker.ping().await.map_err(api) };
            if let Err(e) = self.timed("a ping", ping).await {
                self.reset().await;
                return Err(e);
            }
            // Podman's compatible API takes the type filter as Docker does,
            // but names the event filter's values its own way ("died" for
            // Docker's "die"): ask it for every container event and pick.
            let filters = match self.kind {
                RuntimeKind::Docker => HashMap::from([
                    ("type", vec!["container"]),
                    ("event", vec!["start", "die", "destroy"]),
                ]),
                RuntimeKind::Podman => HashMap::from([("type", vec!["container"])]),
            };
            let options = EventsOptionsBuilder::new().filters(&filters).build();
            let stream = docker.events(Some(options)).filter_map(|event| async move {
                let event = match event {
                    Ok(e) => e,
                    Err(e) => return Some(Err(api(e))),
                };
                let id = ContainerId::parse(event.actor.and_then(|a| a.id).as_deref()?)?;
                match event.action.as_deref() {
                    Some("start") => Some(Ok(RuntimeEvent::Start(id))),
                    // Podman says "remove" where Docker says "destroy".
                    Some("die" | "died" | "destroy" | "remove") => Some(Ok(RuntimeEvent::Stop(id))),
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

    /// A dockerd that answers the version negotiation and then nothing.
    async fn hanging_dockerd(path: &std::path::Path) -> tokio::task::JoinHandle<()> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                let n = conn.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).to_string();
                if request.contains("/version ") {
                    let body = r#"{"ApiVersion":"1.41","Version":"20.10.24"}"#;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(answer.as_bytes()).await;
                } else {
                    // Read, never answered.
                    held.push(conn);
                }
            }
        })
    }

    #[tokio::test]
    async fn a_hanging_dockerd_gives_a_clear_error_within_the_timeout() {
        assert!(
            DOCKER_TIMEOUT <= Duration::from_secs(5),
            "a few seconds, not bollard's 120 s"
        );
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("docker.sock");
        let server = hanging_dockerd(&socket).await;
        let runtime = DockerRuntime::at(&socket, Duration::from_millis(300));
        let id = ContainerId::parse(&"a".repeat(64)).unwrap();
        for _ in 0..2 {
            let started = std::time::Instant::now();
            let err = runtime.inspect(&id).await.unwrap_err().to_string();
            let took = started.elapsed();
            assert!(
                err.contains("dockerd did not answer an inspect of aaaa"),
                "{err}"
            );
            assert!(err.contains("within 300 ms"), "{err}");
            assert!(took < Duration::from_secs(2), "took {took:?}");
        }
        let err = runtime.events().await.err().expect("no events").to_string();
        assert!(err.contains("did not answer a ping"), "{err}");
        server.abort();
    }

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
            wire: Wire::default(),
        };
        assert!(c.owns_address("172.17.0.2".parse().unwrap()));
        assert!(c.owns_address("::ffff:172.17.0.2".parse().unwrap()));
        assert!(!c.owns_address("172.17.0.3".parse().unwrap()));
    }

    #[test]
    fn macs_are_read_as_docker_writes_them() {
        assert_eq!(
            parse_mac("02:42:ac:11:00:02"),
            Some([0x02, 0x42, 0xac, 0x11, 0x00, 0x02])
        );
        for bad in [
            "",
            "02:42:ac:11:00",
            "02:42:ac:11:00:02:03",
            "2:42:ac:11:00:02",
            "zz:42:ac:11:00:02",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        let wire = Wire {
            pid: Some(7),
            macs: vec![("172.17.0.2".parse().unwrap(), [2, 0x42, 0xac, 0x11, 0, 2])],
        };
        assert_eq!(
            wire.mac_of("::ffff:172.17.0.2".parse().unwrap()),
            Some([2, 0x42, 0xac, 0x11, 0, 2])
        );
        assert_eq!(wire.mac_of("172.17.0.3".parse().unwrap()), None);
    }
}
