//! In-process fakes of the outside world (the kernel's records, cgroup
//! paths, the container runtime, STS, the real IMDS, the answer pin),
//! handed to the daemon's own wiring from `metaproxy run`'s own flags and
//! served on 127.0.0.1:0, so the whole request path runs under plain
//! `cargo test` without root, Docker or moto.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use futures_util::{future::BoxFuture, stream::BoxStream, FutureExt as _, StreamExt as _};
use hyper::{Method, Response};
use metaproxy::{
    attribution::{CgroupDirectory, RecordSource, RelaySource},
    config::{flags::RunArgs, EphemeralPorts, Host, RunConfig},
    credentials::{
        CallerIdentity, CredKey, CredentialCache, Credentials, CredentialsError, Secret, Sts,
    },
    daemon::{wire, Prepared, Tasks, World},
    identity::{
        id_token::KeySource, ContainerRuntime, Identities, RuntimeError, RuntimeEvent, RuntimeKind,
    },
    kernel::{addrs::AddrPair, relay::Relay},
    model::caller::Via,
    model::container::Container,
    model::ids::{AccountId, CgroupId, ContainerId},
    ops::connlog::{ConnLog, Connection},
    ops::metrics::{Readiness, RequestMetrics, StsMetrics},
    policy::Policy,
    server::{self, ConnectionCount},
    surface::upstream::{Upstream, UpstreamError},
    surface::Imdsv1Gate,
};
use metaproxy_common::{ConnRecord, AF_INET};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpSocket,
    sync::{mpsc, Notify},
};

pub const ACCOUNT: &str = "123456789012";

/// The kernel's records, keyed by the client's port (every test client is
/// on 127.0.0.1): found by 4-tuple, or (as a translated connection's are)
/// by a slot, which only a claim takes.
#[derive(Default)]
pub struct FakeRecords(
    Mutex<HashMap<u16, ConnRecord>>,
    Mutex<FakeSlots>,
    /// Client ports a relay opened, with the relay's pid.
    Mutex<HashMap<u16, u32>>,
);

/// Slots: which client port is accepted on which slot, and what waits there.
#[derive(Default)]
pub struct FakeSlots {
    pub accepted_on: HashMap<u16, u16>,
    pub pending: HashMap<u16, ConnRecord>,
}

impl FakeRecords {
    /// Files `record` (if any) on `slot`, and says the connection from
    /// `client_port` arrives on it with its source translated.
    pub fn translated(&self, client_port: u16, slot: u16, record: Option<ConnRecord>) {
        let mut slots = self.1.lock().unwrap();
        slots.accepted_on.insert(client_port, slot);
        if let Some(record) = record {
            slots.pending.insert(slot, record);
        }
    }

    /// Says the connection from `client_port` is a relay's (pid
    /// `relay_pid`) that serves the record's network namespace.
    pub fn relayed(&self, client_port: u16, relay_pid: u32) {
        self.2.lock().unwrap().insert(client_port, relay_pid);
    }

    /// Whether a record still waits on `slot`.
    pub fn pending(&self, slot: u16) -> bool {
        self.1.lock().unwrap().pending.contains_key(&slot)
    }
}

impl RelaySource for FakeRecords {
    fn is_local(&self, _: &AddrPair) -> bool {
        // Every test client is on 127.0.0.1.
        true
    }
    fn relay_of(&self, pair: &AddrPair, _: (u32, u32), _: &str) -> Result<Option<Relay>, String> {
        let relays = self.2.lock().unwrap();
        Ok(relays.get(&pair.client.0.port()).map(|&pid| Relay {
            pid,
            comm: "slirp4netns".into(),
        }))
    }
}

impl RecordSource for FakeRecords {
    fn lookup(&self, pair: &AddrPair) -> Result<Option<(ConnRecord, Via)>, String> {
        let port = pair.client.0.port();
        if let Some(record) = self.0.lock().unwrap().get(&port).copied() {
            return Ok(Some((record, Via::Direct)));
        }
        let slots = self.1.lock().unwrap();
        Ok(slots.accepted_on.get(&port).and_then(|slot| {
            let record = slots.pending.get(slot)?;
            Some((*record, Via::Translated { slot: *slot }))
        }))
    }

    fn claim(&self, slot: u16, boot_ns: u64, cgroup: CgroupId) -> Result<bool, String> {
        let mut slots = self.1.lock().unwrap();
        let is_it = slots
            .pending
            .get(&slot)
            .is_some_and(|r| r.boot_ns == boot_ns && r.cgroup_id == cgroup.0);
        Ok(is_it && slots.pending.remove(&slot).is_some())
    }
}

#[derive(Default)]
pub struct FakeCgroups(Mutex<HashMap<CgroupId, Arc<str>>>);

impl CgroupDirectory for FakeCgroups {
    fn cached(&self, id: CgroupId) -> Option<Arc<str>> {
        self.0.lock().unwrap().get(&id).cloned()
    }
    fn resolve(&self, id: CgroupId) -> Option<Arc<str>> {
        self.cached(id)
    }
}

/// Containers by id, plus an event feed the test drives.
pub struct FakeRuntime {
    pub containers: Mutex<HashMap<ContainerId, Container>>,
    pub inspects: AtomicUsize,
    events: Mutex<Option<mpsc::UnboundedReceiver<RuntimeEvent>>>,
    pub events_tx: mpsc::UnboundedSender<RuntimeEvent>,
}

impl Default for FakeRuntime {
    fn default() -> Self {
        let (events_tx, rx) = mpsc::unbounded_channel();
        Self {
            containers: Mutex::default(),
            inspects: AtomicUsize::new(0),
            events: Mutex::new(Some(rx)),
            events_tx,
        }
    }
}

impl ContainerRuntime for FakeRuntime {
    fn inspect<'a>(
        &'a self,
        id: &'a ContainerId,
    ) -> BoxFuture<'a, Result<Option<Container>, RuntimeError>> {
        self.inspects.fetch_add(1, Ordering::SeqCst);
        let found = self.containers.lock().unwrap().get(id).cloned();
        async move { Ok(found) }.boxed()
    }

    fn events(
        &self,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<RuntimeEvent, RuntimeError>>, RuntimeError>>
    {
        let rx = self.events.lock().unwrap().take();
        async move {
            match rx {
                Some(rx) => Ok(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
                    .map(Ok)
                    .boxed()),
                // Only one follower: later calls wait forever.
                None => Ok(futures_util::stream::pending().boxed()),
            }
        }
        .boxed()
    }
}

/// How the fake STS answers.
#[derive(Debug, Clone)]
pub enum StsMode {
    /// Credentials valid this long.
    Ok(Duration),
    /// An AccessDenied error.
    Fail,
    /// Holds every call until `release` is notified, then answers Ok(1 h).
    Hold,
    /// An error with this STS code.
    Error(&'static str),
}

pub struct FakeSts {
    pub mode: Mutex<StsMode>,
    pub calls: Mutex<Vec<CredKey>>,
    pub release: Notify,
    serial: AtomicUsize,
}

impl Default for FakeSts {
    fn default() -> Self {
        Self {
            mode: Mutex::new(StsMode::Ok(Duration::from_secs(3600))),
            calls: Mutex::default(),
            release: Notify::new(),
            serial: AtomicUsize::new(0),
        }
    }
}

impl FakeSts {
    pub fn set(&self, mode: StsMode) {
        *self.mode.lock().unwrap() = mode;
    }
    pub fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
    fn creds(&self, key: &CredKey, valid: Duration) -> Credentials {
        let n = self.serial.fetch_add(1, Ordering::SeqCst);
        Credentials {
            access_key_id: format!("ASIAFAKE{n:08}"),
            secret_access_key: Secret::new(format!("secret-{n}")),
            session_token: Secret::new(format!("token-{n}")),
            expiration: SystemTime::now() + valid,
            last_updated: SystemTime::now(),
            assumed_role_arn: format!(
                "arn:aws:sts::{}:assumed-role/{}/{}",
                key.role_arn.account(),
                key.role_arn.name(),
                key.session_name
            ),
        }
    }
}

impl Sts for FakeSts {
    fn assume_role<'a>(
        &'a self,
        key: &'a CredKey,
    ) -> BoxFuture<'a, Result<Credentials, CredentialsError>> {
        self.calls.lock().unwrap().push(key.clone());
        let mode = self.mode.lock().unwrap().clone();
        async move {
            match mode {
                StsMode::Ok(valid) => Ok(self.creds(key, valid)),
                StsMode::Fail => Err(CredentialsError::AssumeRole {
                    operation: key.operation(),
                    role_arn: key.role_arn.clone(),
                    code: Some("AccessDenied".into()),
                    message: "AccessDenied: not authorized to perform sts:AssumeRole".into(),
                }),
                StsMode::Error(code) => Err(CredentialsError::AssumeRole {
                    operation: key.operation(),
                    role_arn: key.role_arn.clone(),
                    code: Some(code.into()),
                    message: format!("{code}: refused by the fake"),
                }),
                StsMode::Hold => {
                    self.release.notified().await;
                    Ok(self.creds(key, Duration::from_secs(3600)))
                }
            }
        }
        .boxed()
    }

    fn caller_identity(&self) -> BoxFuture<'_, Result<CallerIdentity, CredentialsError>> {
        async move {
            Ok(CallerIdentity {
                account: AccountId::parse(ACCOUNT).unwrap(),
                arn: format!("arn:aws:sts::{ACCOUNT}:assumed-role/instance/i-0"),
            })
        }
        .boxed()
    }
}

/// One request passed through to the real IMDS.
pub type Forwarded = (Method, String, Vec<(String, String)>, Bytes);

/// The real IMDS: a few paths, and a record of what was forwarded.
#[derive(Default)]
pub struct FakeUpstream {
    /// Whether it refuses tokenless requests (HttpTokens=required).
    pub requires_tokens: std::sync::atomic::AtomicBool,
    pub gets: Mutex<Vec<String>>,
    pub forwards: Mutex<Vec<Forwarded>>,
}

impl Upstream for FakeUpstream {
    fn get_cached<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Bytes, UpstreamError>> {
        self.gets.lock().unwrap().push(path.to_string());
        async move {
            match path {
                "/latest/meta-data/placement/region" => Ok(Bytes::from_static(b"eu-west-1")),
                _ => Err(UpstreamError::Status(hyper::StatusCode::NOT_FOUND)),
            }
        }
        .boxed()
    }

    fn requires_tokens(&self) -> BoxFuture<'_, Result<bool, UpstreamError>> {
        let required = self.requires_tokens.load(Ordering::SeqCst);
        async move { Ok(required) }.boxed()
    }

    fn forward<'a>(
        &'a self,
        method: Method,
        path_and_query: &'a str,
        headers: &'a hyper::HeaderMap,
        body: Bytes,
    ) -> BoxFuture<'a, Result<Response<Bytes>, UpstreamError>> {
        let headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        self.forwards
            .lock()
            .unwrap()
            .push((method, path_and_query.to_string(), headers, body));
        async move { Ok(Response::new(Bytes::from_static(b"instance-answer"))) }.boxed()
    }
}

/// What a test container looks like.
#[derive(Default)]
pub struct Spec<'a> {
    pub env: &'a [&'a str],
    pub image_env: &'a [&'a str],
    pub labels: &'a [(&'a str, &'a str)],
    /// Labels the image carries (a container inherits them: they show in
    /// `labels` too).
    pub image_labels: &'a [(&'a str, &'a str)],
}

/// A job container whose runner set `IAM_ROLE=ci-deploy`.
pub fn with_role() -> Spec<'static> {
    Spec {
        env: &["IAM_ROLE=ci-deploy"],
        ..Default::default()
    }
}

/// A caller the bed knows: a cgroup and, for containers, the container.
#[derive(Debug, Clone)]
pub struct Who {
    pub cgroup: CgroupId,
    pub comm: &'static str,
    pub container: Option<ContainerId>,
    /// Where the caller connected (the probe's original destination).
    pub dst: [u8; 4],
}

/// The instance metadata service.
pub const IMDS: [u8; 4] = [169, 254, 169, 254];

impl Who {
    /// The same caller, connecting to `dst` instead.
    pub fn to(&self, dst: [u8; 4]) -> Who {
        Who {
            dst,
            ..self.clone()
        }
    }
}

/// The answer pin in-process: there is no wire, so it records what it was
/// asked to pin, and can be told to fail.
#[derive(Debug, Default)]
pub struct FakeAnswers {
    /// (address, container name) of each pin asked for.
    pub pinned: Mutex<Vec<(std::net::IpAddr, String)>>,
    /// Fail every pin with this reason.
    pub refuse: Mutex<Option<String>>,
}

impl metaproxy::kernel::wire::AnswerPath for FakeAnswers {
    fn pin<'a>(
        &'a self,
        _cgroup: CgroupId,
        peer: std::net::IpAddr,
        container: &'a Container,
    ) -> BoxFuture<'a, Result<(), String>> {
        let result = match self.refuse.lock().unwrap().clone() {
            Some(why) => Err(why),
            None => {
                self.pinned
                    .lock()
                    .unwrap()
                    .push((peer, container.name.clone()));
                Ok(())
            }
        };
        async move { result }.boxed()
    }
}

/// The daemon's own wiring ([`metaproxy::daemon::wire`]) on fakes of the
/// outside world, served on 127.0.0.1:0.
pub struct Bed {
    pub answers: Arc<FakeAnswers>,
    pub addr: SocketAddr,
    pub records: Arc<FakeRecords>,
    pub cgroups: Arc<FakeCgroups>,
    /// Docker (the first `--docker-host`).
    pub runtime: Arc<FakeRuntime>,
    /// Podman, with `--podman-host`.
    pub podman: Option<Arc<FakeRuntime>>,
    pub sts: Arc<FakeSts>,
    pub upstream: Arc<FakeUpstream>,
    pub credentials: Arc<CredentialCache>,
    pub connections: Arc<ConnLog>,
    pub imdsv1: Arc<Imdsv1Gate>,
    pub count: Arc<ConnectionCount>,
    pub identities: Arc<Identities>,
    pub policy: Arc<Policy>,
    pub metrics: RequestMetrics,
    pub sts_metrics: StsMetrics,
    pub readiness: Arc<Readiness>,
    next_cgroup: AtomicUsize,
    // Dropped last: the daemon's tasks stop before the state dir goes.
    _tasks: Tasks,
    _state_dir: tempfile::TempDir,
}

/// The daemon with the defaults of `metaproxy run` and an allow-list of
/// the fake account's roles.
pub async fn bed() -> Bed {
    bed_with(&[]).await
}

/// The daemon with these `metaproxy run` flags (parsed and checked as the
/// command line is), and the fake account's roles allowed unless they say
/// `--allow-role` or `--policy-file` themselves.
pub async fn bed_with(flags: &[&str]) -> Bed {
    bed_with_keys(flags, None).await
}

/// As [`bed_with`], with the ID-token issuer's keys.
pub async fn bed_with_keys(flags: &[&str], issuer_keys: Option<Arc<dyn KeySource>>) -> Bed {
    let state_dir = tempfile::tempdir().unwrap();
    let mut argv: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    if !flags
        .iter()
        .any(|f| *f == "--allow-role" || *f == "--policy-file")
    {
        argv.extend([
            "--allow-role".into(),
            format!("arn:aws:iam::{ACCOUNT}:role/*"),
        ]);
    }
    argv.extend(["--state-dir".into(), state_dir.path().display().to_string()]);
    let args = RunArgs::parse_flags(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let config = RunConfig::from_args_on(&args, &NoEphemeralPorts)
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));

    let records = Arc::new(FakeRecords::default());
    let cgroups = Arc::new(FakeCgroups::default());
    // One fake per runtime socket the flags name.
    let runtimes: Vec<(RuntimeKind, Arc<FakeRuntime>)> = config
        .runtimes
        .iter()
        .map(|r| (r.kind, Arc::new(FakeRuntime::default())))
        .collect();
    let first = |kind| {
        runtimes
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, r)| r.clone())
    };
    let runtime = first(RuntimeKind::Docker).unwrap_or_default();
    let podman = first(RuntimeKind::Podman);
    let sts = Arc::new(FakeSts::default());
    let upstream = Arc::new(FakeUpstream::default());
    let answers = Arc::new(FakeAnswers::default());
    let readiness = Arc::new(Readiness::default());
    let mut tasks = Tasks::default();
    let prepared = Prepared::load(&config, &readiness).unwrap();
    let wired = wire(
        &config,
        prepared,
        World {
            records: records.clone(),
            relays: records.clone(),
            cgroups: cgroups.clone(),
            runtimes: runtimes
                .iter()
                .map(|(k, r)| (*k, r.clone() as Arc<dyn ContainerRuntime>))
                .collect(),
            sts: sts.clone(),
            upstream: upstream.clone(),
            answers: answers.clone(),
            issuer_keys,
        },
        &mut tasks,
        &readiness,
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tasks.spawn(
        "server",
        server::run(listener, wired.pipeline.clone(), std::future::pending()),
    );
    // As the daemon is once STS has named the instance's account.
    let known = async {
        while wired.me.get().is_none() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), known)
        .await
        .expect("account discovery against the fake STS");
    Bed {
        answers,
        addr,
        records,
        cgroups,
        runtime,
        podman,
        sts,
        upstream,
        credentials: wired.credentials,
        connections: wired.connections,
        imdsv1: wired.imdsv1,
        count: wired.count,
        identities: wired.identities,
        policy: wired.policy,
        metrics: wired.requests,
        sts_metrics: wired.sts.metrics().clone(),
        readiness,
        next_cgroup: AtomicUsize::new(1000),
        _tasks: tasks,
        _state_dir: state_dir,
    }
}

/// A host whose ephemeral ports are the kernel's defaults, so the checks
/// do not depend on the machine the tests run on.
struct NoEphemeralPorts;

impl Host for NoEphemeralPorts {
    fn ephemeral_ports(&self) -> std::io::Result<EphemeralPorts> {
        Ok(EphemeralPorts::parse("32768 60999", "").unwrap())
    }
}

/// Waits until `f` holds, polling, or fails the test after 5 s naming
/// `what`.
pub async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A full container id made from a small number.
/// The kernel's record of `who`'s connect.
pub fn record_of(who: &Who) -> ConnRecord {
    let mut comm = [0u8; 16];
    comm[..who.comm.len()].copy_from_slice(who.comm.as_bytes());
    ConnRecord {
        cgroup_id: who.cgroup.0,
        pid: 4242,
        family: AF_INET,
        orig_addr: [u32::from_ne_bytes(who.dst), 0, 0, 0],
        orig_port: 80,
        comm,
        ..Default::default()
    }
}

pub fn container_id(n: usize) -> ContainerId {
    ContainerId::parse(&format!("{n:064x}")).unwrap()
}

impl Bed {
    fn new_cgroup(&self, path: String) -> CgroupId {
        let id = CgroupId(self.next_cgroup.fetch_add(1, Ordering::SeqCst) as u64);
        self.cgroups.0.lock().unwrap().insert(id, path.into());
        id
    }

    /// A running container (known to Docker) and a process in it.
    pub fn container(&self, n: usize, spec: Spec<'_>) -> Who {
        let id = container_id(n);
        self.container_in(&self.runtime, &format!("/docker/{id}"), n, spec)
    }

    /// A process in a container that `outer` (a Docker-in-Docker service
    /// container) runs: its cgroup is below the outer one's, and the
    /// runtime the daemon follows knows only the outer container.
    pub fn inner_container(&self, outer: &Who, n: usize) -> Who {
        let outer_id = outer.container.clone().expect("an outer container");
        let inner_id = container_id(n);
        Who {
            cgroup: self.new_cgroup(format!("/docker/{outer_id}/docker/{inner_id}")),
            comm: "aws",
            container: Some(outer_id),
            dst: IMDS,
        }
    }

    /// A process in cgroup `below` of container `outer` (`/init`, where
    /// docker:dind moves its own processes; `/docker/buildkit/<id>`, where
    /// its BuildKit runs build steps).
    pub fn process_below(&self, outer: &Who, below: &str) -> Who {
        let outer_id = outer.container.clone().expect("an outer container");
        Who {
            cgroup: self.new_cgroup(format!("/docker/{outer_id}{below}")),
            comm: "sh",
            container: Some(outer_id),
            dst: IMDS,
        }
    }

    /// A running container of Podman (`--podman-host`), in the cgroup
    /// Podman's systemd driver gives it, and a process in it.
    pub fn podman_container(&self, n: usize, spec: Spec<'_>) -> Who {
        let id = container_id(n);
        let podman = self.podman.as_ref().expect("a bed with --podman-host");
        self.container_in(
            podman,
            &format!("/machine.slice/libpod-{id}.scope"),
            n,
            spec,
        )
    }

    /// Container `n`, known to `runtime`, whose init runs in `cgroup`.
    fn container_in(&self, runtime: &FakeRuntime, cgroup: &str, n: usize, spec: Spec<'_>) -> Who {
        let id = container_id(n);
        let cgroup_id = self.new_cgroup(cgroup.to_string());
        runtime.containers.lock().unwrap().insert(
            id.clone(),
            Container {
                id: id.clone(),
                name: format!("job-{n}"),
                // As gitlab-runner labels its job containers.
                labels: std::iter::once((
                    metaproxy::model::gitlab::JOB_LABEL.to_string(),
                    n.to_string(),
                ))
                .chain(
                    spec.labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string())),
                )
                .collect(),
                env: spec.env.iter().map(|s| s.to_string()).collect(),
                image_env: spec.image_env.iter().map(|s| s.to_string()).collect(),
                image_labels: spec
                    .image_labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                addresses: Some(vec!["127.0.0.1".parse().unwrap()]),
                cgroup: Some(cgroup.to_string()),
                wire: Default::default(),
            },
        );
        Who {
            cgroup: cgroup_id,
            comm: "python3",
            container: Some(id),
            dst: IMDS,
        }
    }

    /// A process in a cgroup at `path` (a host service, or a container the
    /// runtime does not know).
    pub fn process_at(&self, path: &str, comm: &'static str) -> Who {
        Who {
            cgroup: self.new_cgroup(path.to_string()),
            comm,
            container: None,
            dst: IMDS,
        }
    }

    /// Sends one request as `who` (the fake probe records the connection
    /// first, as the kernel would) and returns (status, headers, body).
    pub async fn request(
        &self,
        who: &Who,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut raw =
            format!("{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n");
        for (k, v) in headers {
            raw.push_str(&format!("{k}: {v}\r\n"));
        }
        raw.push_str("\r\n");
        self.send_raw(Some(who), raw.as_bytes()).await
    }

    /// Opens a connection as `who` and sends nothing.
    pub async fn connect(&self, who: &Who) -> tokio::net::TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        self.record(socket.local_addr().unwrap().port(), who);
        socket.connect(self.addr).await.unwrap()
    }

    /// Opens a connection the probe did not record (a direct connect to
    /// the listen address) and sends nothing.
    pub async fn connect_unrecorded(&self) -> tokio::net::TcpStream {
        tokio::net::TcpStream::connect(self.addr).await.unwrap()
    }

    fn record(&self, port: u16, who: &Who) {
        self.records.0.lock().unwrap().insert(port, record_of(who));
    }

    /// Sends one request as a connection whose source was translated on
    /// the way, accepted on `slot` from 127.0.0.1 (where the kernel filed
    /// `who`'s record, if given), and reads the answer.
    pub async fn request_translated(&self, who: Option<&Who>, slot: u16, path: &str) -> Answer {
        self.request_via(who, slot, None, path).await
    }

    /// As [`Self::request_translated`], from a relay with pid `relay` (if
    /// given) that serves the record's network namespace.
    pub async fn request_via(
        &self,
        who: Option<&Who>,
        slot: u16,
        relay: Option<u32>,
        path: &str,
    ) -> Answer {
        let raw =
            format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n");
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        self.records.translated(port, slot, who.map(record_of));
        if let Some(pid) = relay {
            self.records.relayed(port, pid);
        }
        let mut stream = socket.connect(self.addr).await.unwrap();
        stream.write_all(raw.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
        Answer::parse(&out)
    }

    /// Sends raw bytes on a new connection (recorded for `who`, or not at
    /// all) and reads the answer until the server closes.
    pub async fn send_raw(&self, who: Option<&Who>, bytes: &[u8]) -> Answer {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        if let Some(who) = who {
            self.record(port, who);
        }
        let mut stream = socket.connect(self.addr).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
        self.records.0.lock().unwrap().remove(&port);
        Answer::parse(&out)
    }

    /// A token for `who`.
    pub async fn token(&self, who: &Who) -> String {
        let a = self
            .request(
                who,
                "PUT",
                "/latest/api/token",
                &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")],
            )
            .await;
        assert_eq!(a.status, 200, "{a:?}");
        a.body
    }

    /// The connection log, newest last.
    pub fn log(&self) -> Vec<Connection> {
        self.connections.snapshot_and_subscribe().0
    }

    pub fn last_log(&self) -> Connection {
        self.log().pop().expect("a logged connection")
    }
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    fn parse(raw: &[u8]) -> Self {
        let text = String::from_utf8_lossy(raw);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Self {
            status,
            headers,
            body: body.to_string(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }
}

/// Reads one response (head and a `Content-Length` body) from a connection
/// that stays open; `None` if the server closed it first.
pub async fn read_response(stream: &mut tokio::net::TcpStream) -> Option<Answer> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("a response within 10 s")
            .ok()?;
        if n == 0 {
            return None;
        }
        raw.push(byte[0]);
    }
    let head = Answer::parse(&raw);
    let len: usize = head
        .header("content-length")
        .map_or(0, |v| v.parse().unwrap());
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.ok()?;
    raw.extend_from_slice(&body);
    Some(Answer::parse(&raw))
}
