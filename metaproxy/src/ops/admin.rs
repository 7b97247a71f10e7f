//! The admin socket's server side: a Unix socket only root can use, speaking
//! HTTP, through which `metaproxy connections` (and scripts, with `curl
//! --unix-socket`) read the daemon's state. The CLI's side is
//! [`crate::ops::admin_client`].
//!
//! * `GET /v1/connections` - recent connections, a JSON array, oldest first
//! * `GET /v1/connections?follow=true` - the same, then new ones as they
//!   come, one JSON object per line
//! * `GET /v1/status` - pid, probe generation, map sizes
//! * `GET /v1/explain?container=NAME` - the role decision for a container,
//!   rule by rule

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fs,
    future::Future,
    io,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full, StreamBody};
use hyper::{body::Frame, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::{wrappers::BroadcastStream, StreamExt as _};

use crate::{
    model::ids::RoleArn,
    model::interface::Interface,
    ops::{
        accept::{self, Rules, WhenFull},
        connlog::ConnLog,
    },
};

/// The daemon's status, as `GET /v1/status` shows it.
pub trait StatusSource: Send + Sync + 'static {
    fn status(&self) -> Status;
}

/// What `GET /v1/status` answers and `metaproxy status` prints: one type
/// for the daemon that writes it and the client that reads it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub pid: u32,
    /// The probe generation in force.
    pub generation: u64,
    pub guard: GuardStatus,
    /// The layer-2 lock. Absent from a daemon older than it.
    #[serde(default)]
    pub layer2: Layer2Status,
    pub maps: MapStatus,
    pub connections: ConnectionStatus,
    /// What the daemon knows of AWS (for `metaproxy doctor`).
    #[serde(default)]
    pub aws: AwsStatus,
}

/// The daemon's own identity and the instance's IMDS mode, as measured.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AwsStatus {
    /// Its own ARN (GetCallerIdentity), once its credentials have worked.
    pub identity: Option<String>,
    pub account: Option<String>,
    /// Whether the instance requires IMDSv2 tokens, once it has answered.
    pub instance_requires_tokens: Option<bool>,
}

/// A dry AssumeRole's outcome (`GET /v1/try-role?arn=ARN`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Trial {
    pub ok: bool,
    /// STS's error code, when it refused.
    pub code: Option<String>,
    pub message: Option<String>,
}

/// Assumes a role for the shortest time and drops the credentials: does
/// its trust policy let the daemon in?
pub trait RoleTrial: Send + Sync + 'static {
    fn try_role<'a>(
        &'a self,
        arn: &'a RoleArn,
        external_id: Option<&'a str>,
    ) -> futures_util::future::BoxFuture<'a, Trial>;
}

/// Where the packet guard is and what it dropped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuardStatus {
    /// `tcx` or `netlink` (clsact).
    pub mode: String,
    /// The interfaces it is attached to.
    pub interfaces: Vec<Interface>,
    /// Each guarded address and the interface that routes to it.
    pub routes: Vec<GuardRoute>,
    /// Guarded addresses no route leads to.
    pub unrouted: Vec<String>,
    /// Packets dropped, by kind.
    pub dropped: BTreeMap<String, u64>,
}

/// The layer-2 lock: what it covers on this host, and what it refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layer2Status {
    /// Packet, AF_XDP and raw IPv6 sockets are refused to jobs: `true`
    /// where the BPF LSM runs.
    pub sockets_refused: bool,
    /// Why they are not, where they are not: the gap a job with `NET_RAW`
    /// could use (forged ARP and MACs on a shared bridge, sniffing from
    /// the host network).
    pub gap: Option<String>,
    /// Refusals, by kind.
    pub refused: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuardRoute {
    pub address: String,
    pub interface: String,
    /// Whether the guard is on that interface.
    pub guarded: bool,
}

/// Entries in the probe's maps.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapStatus {
    pub pending: usize,
    pub conns: usize,
    /// Slots with a connect waiting on them.
    #[serde(default)]
    pub slots: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConnectionStatus {
    pub open: usize,
    pub largest_per_container: usize,
    /// Connections closed at once for being over a cap.
    pub shed: u64,
}

/// `GET /v1/explain?container=NAME`: the role decision for a running
/// container, rule by rule.
pub trait Explainer: Send + Sync + 'static {
    fn explain<'a>(&'a self, container: &'a str) -> futures_util::future::BoxFuture<'a, String>;
}

/// What the admin API reads.
pub struct AdminState {
    pub connections: Arc<ConnLog>,
    pub status: Arc<dyn StatusSource>,
    pub explain: Arc<dyn Explainer>,
    pub roles: Arc<dyn RoleTrial>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").finish_non_exhaustive()
    }
}

type Body = BoxBody<Bytes, Infallible>;

/// Binds the admin socket: its directory is 0700 and the socket 0600, so
/// only root reaches it. A stale socket from a dead daemon is replaced; a
/// live daemon's is not.
pub async fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another metaproxy is serving {}", path.display()),
            ));
        }
        fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Admin connections served at once; more wait in the backlog.
const MAX_ADMIN_CONNECTIONS: usize = 32;

/// Serves the admin API until `shutdown` resolves, then removes the socket.
pub async fn run(
    listener: UnixListener,
    path: PathBuf,
    state: Arc<AdminState>,
    shutdown: impl Future<Output = ()>,
) {
    // Root alone can connect; the cap keeps even a runaway script of its
    // from taking the descriptors the IMDS listener needs.
    let rules = Rules {
        name: "admin",
        permits: Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS)),
        when_full: WhenFull::Wait,
    };
    let mut tasks = accept::serve(listener, rules, shutdown, |stream, _, permit| {
        let state = state.clone();
        async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(req, &state).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        }
    })
    .await;
    // Followers stream forever: end them with the daemon.
    tasks.abort_all();
    let _ = fs::remove_file(&path);
}

async fn route(req: Request<hyper::body::Incoming>, state: &AdminState) -> Response<Body> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    let follow = req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv == "follow=true" || kv == "follow=1")
    });
    match req.uri().path() {
        "/v1/connections" if follow => follow_connections(state),
        "/v1/connections" => {
            let (recent, _) = state.connections.snapshot_and_subscribe();
            json(&recent)
        }
        "/v1/status" => json(&state.status.status()),
        "/v1/try-role" => {
            let param = |name: &str| {
                req.uri().query().and_then(|q| {
                    q.split('&')
                        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                })
            };
            let arn = param("arn").and_then(|a| RoleArn::parse(a).ok());
            // STS's ExternalId characters only: no escaping to undo.
            let external_id = param("external_id");
            let valid = external_id.is_none_or(crate::model::ids::valid_external_id);
            match arn {
                Some(arn) if valid => json(&state.roles.try_role(&arn, external_id).await),
                _ => text(
                    StatusCode::BAD_REQUEST,
                    "arn=ROLE_ARN required (and external_id=ID, if any, as STS takes it)\n",
                ),
            }
        }
        "/v1/explain" => {
            let container = req.uri().query().and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix("container="))
                    .filter(|c| crate::model::ids::is_container_ref(c))
            });
            match container {
                Some(c) => {
                    let mut resp = Response::new(
                        Full::new(Bytes::from(state.explain.explain(c).await)).boxed(),
                    );
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        "text/plain; charset=utf-8".parse().expect("static"),
                    );
                    resp
                }
                None => text(StatusCode::BAD_REQUEST, "container=NAME required\n"),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn follow_connections(state: &AdminState) -> Response<Body> {
    let (recent, rx) = state.connections.snapshot_and_subscribe();
    let backlog = tokio_stream::iter(recent.into_iter().map(Ok));
    // A follower too slow to keep up misses entries rather than slowing the
    // daemon; it is told how many.
    let live =
        BroadcastStream::new(rx).map(|r| r.map(|e| e.connection()).map_err(|e| e.to_string()));
    let lines = backlog.chain(live).map(|item| {
        let line = match item {
            Ok(conn) => serde_json::to_string(&conn).unwrap_or_default(),
            Err(lag) => serde_json::json!({ "missed": lag }).to_string(),
        };
        Ok::<_, Infallible>(Frame::data(Bytes::from(line + "\n")))
    });
    let mut resp = Response::new(StreamBody::new(lines).boxed());
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "application/x-ndjson".parse().expect("static"),
    );
    resp
}

fn json<T: serde::Serialize>(value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "application/json".parse().expect("static"),
    );
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    crate::ops::http::text(status, body).map(http_body_util::BodyExt::boxed)
}

#[cfg(test)]
mod status_tests {
    use super::*;

    #[test]
    fn the_status_reads_back_as_written_under_the_keys_the_tools_use() {
        let status = Status {
            pid: 7,
            generation: 3,
            guard: GuardStatus {
                mode: "tcx".into(),
                interfaces: vec![Interface {
                    index: 2,
                    name: "eth0".into(),
                }],
                routes: vec![GuardRoute {
                    address: "169.254.169.254".into(),
                    interface: "eth0".into(),
                    guarded: true,
                }],
                unrouted: vec!["fd00:ec2::254".into()],
                dropped: BTreeMap::from([("forwarded".to_string(), 4)]),
            },
            layer2: Layer2Status {
                sockets_refused: true,
                gap: None,
                refused: BTreeMap::from([("packet_socket".to_string(), 2)]),
            },
            maps: MapStatus {
                pending: 0,
                conns: 1,
                slots: 0,
            },
            connections: ConnectionStatus {
                open: 5,
                largest_per_container: 2,
                shed: 0,
            },
            aws: AwsStatus {
                identity: Some("arn:aws:sts::123456789012:assumed-role/runner/i-0".into()),
                account: Some("123456789012".into()),
                instance_requires_tokens: Some(true),
            },
        };
        let text = serde_json::to_string(&status).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["connections"]["open"], 5);
        assert_eq!(value["maps"]["conns"], 1);
        assert_eq!(value["guard"]["dropped"]["forwarded"], 4);
        assert_eq!(value["guard"]["interfaces"][0]["name"], "eth0");
        assert_eq!(value["aws"]["instance_requires_tokens"], true);
        assert_eq!(value["layer2"]["refused"]["packet_socket"], 2);
        assert_eq!(value["layer2"]["sockets_refused"], true);
        // A daemon from before the aws section still reads.
        let mut old = value.clone();
        old.as_object_mut().unwrap().remove("aws");
        old.as_object_mut().unwrap().remove("layer2");
        let old = serde_json::from_value::<Status>(old).unwrap();
        assert_eq!(old.aws, AwsStatus::default());
        assert_eq!(old.layer2, Layer2Status::default());
        assert_eq!(serde_json::from_str::<Status>(&text).unwrap(), status);
    }
}
