//! A fake of the EC2 instance metadata service, bound to 169.254.169.254:80
//! inside a test network namespace. It plays the instance's real IMDS: the
//! daemon fetches the instance profile's credentials from it, and it records
//! every caller (and the cgroup of a caller from the host namespace, where
//! the daemon's calls come from the same address as any other process's)
//! so a test can assert that no intercepted process reached it.
//!
//! It speaks IMDSv2 as AWS does: `PUT /latest/api/token` with
//! `X-aws-ec2-metadata-token-ttl-seconds` (1-21600, echoed back), 400
//! without it, 403 with `X-Forwarded-For`, 401 for a GET with an unknown
//! token. IMDSv1 (no token) is refused with 401 unless allowed.
//!
//! Like the real IMDS, it answers a token PUT with the IP TTL (hop limit)
//! set to the instance's `HttpPutResponseHopLimit` (2 unless a test sets
//! another), so a token reaches a container one forward away and no
//! further. The bed puts it one routed hop from the containers' host
//! ([`crate::imds_net`]) for that to mean what it means on EC2.

use std::{
    collections::HashSet,
    net::SocketAddr,
    os::fd::{AsRawFd as _, RawFd},
    path::PathBuf,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;

use crate::{netns::NetNs, sock_diag::SockDiag};

/// The secret a user-data fetch would leak; tests grep for it.
pub const USER_DATA_MARKER: &str = "metaproxy-test-user-data-secret-5f3a9c";
pub const INSTANCE_ROLE: &str = "metaproxy-instance-role";
pub const ACCOUNT_ID: &str = "123456789012";
pub const REGION: &str = "us-east-1";

/// The instance profile's credentials the fake hands out.
#[derive(Clone, Serialize)]
pub struct InstanceCredentials {
    #[serde(rename = "AccessKeyId")]
    pub access_key_id: String,
    #[serde(rename = "SecretAccessKey")]
    pub secret_access_key: String,
    #[serde(rename = "Token")]
    pub token: String,
    /// `YYYY-MM-DDTHH:MM:SSZ`
    #[serde(rename = "Expiration")]
    pub expiration: String,
}

impl std::fmt::Debug for InstanceCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceCredentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default)]
pub struct FakeImdsConfig {
    pub credentials: Option<InstanceCredentials>,
    /// Serve GETs without a token (IMDSv1).
    pub allow_v1: bool,
    /// The namespace that plays the EC2 host: each call records the
    /// cgroup of its socket there, if it has one (see [`Call::cgroup_id`]).
    pub host_netns: Option<PathBuf>,
}

/// One TCP connection the fake accepted, with the requests made on it.
#[derive(Debug, Clone)]
pub struct Call {
    pub peer: SocketAddr,
    /// The cgroup of the calling socket, when it is one of the host
    /// namespace's (`None` for a connection forwarded from another
    /// namespace, a container's, or when no host namespace was given).
    pub cgroup_id: Option<u64>,
    pub requests: Vec<(String, String, u16)>,
}

/// The hop limit of token answers unless a test sets another: AWS's
/// default for AMIs that require IMDSv2 (AL2023), and what it recommends
/// for containers.
pub const DEFAULT_PUT_HOP_LIMIT: u8 = 2;

struct Shared {
    calls: Mutex<Vec<Call>>,
    tokens: Mutex<HashSet<String>>,
    put_hop_limit: AtomicU8,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            calls: Mutex::default(),
            tokens: Mutex::default(),
            put_hop_limit: AtomicU8::new(DEFAULT_PUT_HOP_LIMIT),
        }
    }
}

/// The running fake; stops on drop.
pub struct FakeImds {
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FakeImds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeImds").finish_non_exhaustive()
    }
}

impl FakeImds {
    /// Starts the fake on 169.254.169.254:80 in `netns` (which must have that
    /// address on its `lo`).
    pub fn start(netns: &NetNs, config: FakeImdsConfig) -> anyhow::Result<Self> {
        Self::start_at(netns, "169.254.169.254:80".parse().expect("static"), config)
    }

    /// Starts the fake on `addr` in `netns`: tests also put it where a
    /// wrongly passed-through connect would land.
    pub fn start_at(
        netns: &NetNs,
        addr: SocketAddr,
        config: FakeImdsConfig,
    ) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let ns_path = netns.path();
        let state = shared.clone();
        let diag = config
            .host_netns
            .as_deref()
            .map(SockDiag::open_in)
            .transpose()
            .context("sock_diag in the host namespace")?;
        let config = Arc::new(config);
        let thread = std::thread::Builder::new()
            .name("fake-imds".into())
            .spawn(move || {
                let bound = (|| -> anyhow::Result<std::net::TcpListener> {
                    let file = std::fs::File::open(&ns_path)?;
                    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
                    let listener = std::net::TcpListener::bind(addr)?;
                    listener.set_nonblocking(true)?;
                    Ok(listener)
                })();
                let listener = match bound {
                    Ok(l) => {
                        let _ = ready_tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(serve(listener, state, config, diag, stop_rx));
            })?;
        ready_rx
            .recv()
            .context("fake IMDS thread died")?
            .context("starting the fake IMDS")?;
        Ok(Self {
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Every connection accepted so far.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.calls.lock().unwrap().clone()
    }

    /// Sets the IP TTL of token answers from now on
    /// (`HttpPutResponseHopLimit`).
    pub fn set_put_hop_limit(&self, hops: u8) {
        self.shared.put_hop_limit.store(hops, Ordering::Relaxed);
    }

    /// Every session token it has handed out.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.tokens.lock().unwrap().iter().cloned().collect()
    }
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    config: Arc<FakeImdsConfig>,
    diag: Option<SockDiag>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                // Asked at once, while the caller waits for its answer (so
                // its socket is there to be found).
                let cgroup_id = match (&diag, stream.local_addr()) {
                    (Some(diag), Ok(local)) => diag.tcp_cgroup(peer, local),
                    _ => None,
                };
                let index = {
                    let mut calls = shared.calls.lock().unwrap();
                    calls.push(Call { peer, cgroup_id, requests: Vec::new() });
                    calls.len() - 1
                };
                let (shared, config) = (shared.clone(), config.clone());
                let fd = stream.as_raw_fd();
                let v6 = peer.is_ipv6();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let resp = respond(&req, &shared, &config);
                        if req.method() == Method::PUT && resp.status() == StatusCode::OK {
                            set_hop_limit(fd, v6, shared.put_hop_limit.load(Ordering::Relaxed));
                        }
                        shared.calls.lock().unwrap()[index].requests.push((
                            req.method().to_string(),
                            req.uri().path().to_string(),
                            resp.status().as_u16(),
                        ));
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
}

/// Sets the TTL of what `fd` sends next. The service runs only while its
/// connection (and so `fd`) is open.
fn set_hop_limit(fd: RawFd, v6: bool, hops: u8) {
    let (level, name) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS)
    } else {
        (libc::IPPROTO_IP, libc::IP_TTL)
    };
    let value = libc::c_int::from(hops);
    // SAFETY: value is a valid c_int of the size given; fd is the open
    // connection this service answers on.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
}

fn respond(
    req: &Request<Incoming>,
    shared: &Shared,
    config: &FakeImdsConfig,
) -> Response<Full<Bytes>> {
    let status = |code: StatusCode| {
        let mut r = Response::new(Full::new(Bytes::from(
            code.canonical_reason().unwrap_or("").to_string(),
        )));
        *r.status_mut() = code;
        r
    };
    let path = req.uri().path();
    if req.headers().contains_key("x-forwarded-for") {
        return status(StatusCode::FORBIDDEN);
    }
    if path == "/latest/api/token" {
        if req.method() != Method::PUT {
            return status(StatusCode::METHOD_NOT_ALLOWED);
        }
        let ttl = req
            .headers()
            .get("x-aws-ec2-metadata-token-ttl-seconds")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|t| (1..=21600).contains(t));
        let Some(ttl) = ttl else {
            return status(StatusCode::BAD_REQUEST);
        };
        let token = random_token();
        shared.tokens.lock().unwrap().insert(token.clone());
        let mut r = Response::new(Full::new(Bytes::from(token)));
        r.headers_mut()
            .insert("x-aws-ec2-metadata-token-ttl-seconds", ttl.into());
        return r;
    }
    if req.method() != Method::GET {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    match req
        .headers()
        .get("x-aws-ec2-metadata-token")
        .and_then(|v| v.to_str().ok())
    {
        Some(t) if shared.tokens.lock().unwrap().contains(t) => {}
        None if config.allow_v1 => {}
        _ => return status(StatusCode::UNAUTHORIZED),
    }
    let body = match path {
        "/latest/meta-data/iam/security-credentials/" => INSTANCE_ROLE.to_string(),
        p if p == format!("/latest/meta-data/iam/security-credentials/{INSTANCE_ROLE}") => match &config.credentials {
            Some(c) => serde_json::json!({
                "Code": "Success",
                "LastUpdated": c.expiration,
                "Type": "AWS-HMAC",
                "AccessKeyId": c.access_key_id,
                "SecretAccessKey": c.secret_access_key,
                "Token": c.token,
                "Expiration": c.expiration,
            })
            .to_string(),
            None => return status(StatusCode::NOT_FOUND),
        },
        "/latest/meta-data/iam/info" => serde_json::json!({
            "Code": "Success",
            "InstanceProfileArn": format!("arn:aws:iam::{ACCOUNT_ID}:instance-profile/{INSTANCE_ROLE}"),
            "InstanceProfileId": "AIPAEXAMPLEPROFILEID",
        })
        .to_string(),
        "/latest/meta-data/placement/region" => REGION.to_string(),
        "/latest/meta-data/placement/availability-zone" => format!("{REGION}a"),
        "/latest/meta-data/instance-id" => "i-0123456789abcdef0".to_string(),
        "/latest/dynamic/instance-identity/document" => serde_json::json!({
            "accountId": ACCOUNT_ID,
            "region": REGION,
            "availabilityZone": format!("{REGION}a"),
            "instanceId": "i-0123456789abcdef0",
        })
        .to_string(),
        "/latest/user-data" => format!("#!/bin/sh\nexport SECRET={USER_DATA_MARKER}\n"),
        _ => return status(StatusCode::NOT_FOUND),
    };
    Response::new(Full::new(Bytes::from(body)))
}

fn random_token() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut out = String::new();
    for _ in 0..4 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}
