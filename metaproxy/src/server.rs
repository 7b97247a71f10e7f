//! The accept loop: every connection the probe redirected arrives here, is
//! attributed to the cgroup that opened it, and is served; a connection the
//! probe did not record (a direct connect to the listen address, or one from
//! outside the host) is refused.

use std::{
    convert::Infallible,
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, Request, Response, StatusCode};

use hyper_util::rt::TokioIo;
use metaproxy_common::{ConnRecord, AF_INET};
use tokio::net::{TcpListener, TcpStream};

use crate::{
    cgroup::CgroupPaths,
    connlog::{ConnLog, Connection, Outcome},
    imds::{Handled, Imds},
    policy::RoleDecision,
    probe::Probe,
};

/// What the accept loop needs.
#[derive(Debug)]
pub struct State {
    pub probe: Probe,
    pub cgroups: Arc<CgroupPaths>,
    pub connections: ConnLog,
    pub imds: Imds,
}

/// Refusals are logged at most this often per second: anything on the
/// host can open connections to the listen address, and must not be able
/// to fill the disk with our log.
static REFUSAL_LOG: RateLimit = RateLimit::new(10);

/// Lets `per_second` events a second through and counts the others.
#[derive(Debug)]
pub struct RateLimit {
    per_second: u32,
    /// (second, events let through in it, events held back since the last
    /// one let through)
    window: std::sync::Mutex<(u64, u32, u64)>,
}

impl RateLimit {
    pub const fn new(per_second: u32) -> Self {
        Self {
            per_second,
            window: std::sync::Mutex::new((0, 0, 0)),
        }
    }

    /// `Some(held back since the last one)` if this event may be logged.
    pub fn allow(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.allow_at(now)
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.0 != now {
            w.0 = now;
            w.1 = 0;
        }
        if w.1 < self.per_second {
            w.1 += 1;
            Some(std::mem::take(&mut w.2))
        } else {
            w.2 += 1;
            None
        }
    }
}

/// Who is on the other end of an accepted connection.
#[derive(Debug, Clone)]
pub struct Caller {
    pub record: ConnRecord,
    pub cgroup: Option<String>,
    /// The client's address, as accept() reported it.
    pub peer: SocketAddr,
}

/// Serves `listener` until `shutdown` resolves. Connections already being
/// served are given a moment to finish.
pub async fn run(listener: TcpListener, state: Arc<State>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tasks.spawn(handle(stream, peer, state.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        tracing::warn!("connections still open at shutdown were dropped");
    }
}

async fn handle(stream: TcpStream, peer: SocketAddr, state: Arc<State>) {
    let caller = match attribute(&stream, peer, &state).await {
        Ok(caller) => caller,
        Err(reason) => {
            if let Some(suppressed) = REFUSAL_LOG.allow() {
                tracing::warn!(client = %peer, %reason, suppressed, "refusing connection");
            }
            state.connections.push(refused(peer, reason));
            serve(stream, move |_req| async { forbidden() }).await;
            return;
        }
    };
    tracing::debug!(
        client = %peer,
        cgroup_id = caller.record.cgroup_id,
        cgroup = caller.cgroup.as_deref().unwrap_or("?"),
        pid = caller.record.pid,
        "accepted connection"
    );
    let caller = Arc::new(caller);
    serve(stream, move |req| {
        let (caller, state) = (caller.clone(), state.clone());
        async move {
            let request = format!("{} {}", req.method(), req.uri().path());
            let (resp, handled) = state.imds.handle(req, &caller).await;
            state
                .connections
                .push(answered(peer, &caller, request, handled));
            resp
        }
    })
    .await;
}

/// Finds the kernel's record of this connection.
async fn attribute(
    stream: &TcpStream,
    peer: SocketAddr,
    state: &Arc<State>,
) -> Result<Caller, String> {
    let local = stream
        .local_addr()
        .map_err(|e| format!("no local address: {e}"))?;
    let record = match state.probe.lookup(peer, local) {
        Ok(Some(record)) => record,
        Ok(None) => return Err("no probe record for this connection".into()),
        Err(e) => return Err(format!("probe lookup failed: {e}")),
    };
    let id = record.cgroup_id;
    // Known cgroups are answered from memory; only a new one walks the tree.
    let cgroup = match state.cgroups.cached(id) {
        Some(path) => Some(path),
        None => {
            let st = state.clone();
            tokio::task::spawn_blocking(move || st.cgroups.path_of(id))
                .await
                .ok()
                .flatten()
        }
    };
    Ok(Caller {
        record,
        cgroup,
        peer,
    })
}

async fn serve<F, Fut>(stream: TcpStream, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let fut = handler(req);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        // Slow or silent clients must not hold a task forever.
        .header_read_timeout(Duration::from_secs(5))
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

fn forbidden() -> Response<Full<Bytes>> {
    let mut resp = crate::imds::status(StatusCode::FORBIDDEN);
    resp.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    resp
}

fn answered(peer: SocketAddr, caller: &Caller, request: String, handled: Handled) -> Connection {
    let r = &caller.record;
    let container = handled.container.as_deref();
    Connection {
        time: boot_ns_to_rfc3339(r.boot_ns),
        client: peer.to_string(),
        cgroup_id: Some(r.cgroup_id),
        cgroup: caller.cgroup.clone(),
        pid: Some(r.pid),
        comm: Some(comm(&r.comm)),
        original_dst: Some(original_dst(r).to_string()),
        container_id: container.map(|c| c.id.clone()),
        container: container.map(|c| c.name.clone()),
        role: container.and_then(|c| match &c.role {
            RoleDecision::Role(role) => Some(role.arn.clone()),
            _ => None,
        }),
        request: Some(request),
        outcome: handled.outcome,
        reason: handled.reason,
    }
}

fn refused(peer: SocketAddr, reason: String) -> Connection {
    Connection {
        time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        client: peer.to_string(),
        cgroup_id: None,
        cgroup: None,
        pid: None,
        comm: None,
        original_dst: None,
        container_id: None,
        container: None,
        role: None,
        request: None,
        outcome: Outcome::Refused,
        reason: Some(reason),
    }
}

/// The destination the caller asked for before the probe rewrote it.
pub fn original_dst(r: &ConnRecord) -> SocketAddr {
    let ip = if r.family == AF_INET {
        IpAddr::V4(Ipv4Addr::from(r.orig_addr[0].to_ne_bytes()))
    } else {
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.chunks_mut(4).zip(r.orig_addr) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(octets))
    };
    SocketAddr::new(ip, r.orig_port)
}

pub fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// The kernel stamps records with CLOCK_BOOTTIME; show them as wall time.
fn boot_ns_to_rfc3339(boot_ns: u64) -> String {
    let now = SystemTime::now();
    let wall = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .ok()
        .map(|ts| Duration::from(ts).as_nanos() as u64)
        .and_then(|boot_now| {
            now.checked_sub(Duration::from_nanos(boot_now.saturating_sub(boot_ns)))
        })
        .unwrap_or(now);
    humantime::format_rfc3339_millis(wall).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_lets_a_few_through_and_counts_the_rest() {
        let limit = RateLimit::new(2);
        assert_eq!(limit.allow_at(100), Some(0));
        assert_eq!(limit.allow_at(100), Some(0));
        assert_eq!(limit.allow_at(100), None);
        assert_eq!(limit.allow_at(100), None);
        // A new second: the first event says how many were held back.
        assert_eq!(limit.allow_at(101), Some(2));
        assert_eq!(limit.allow_at(101), Some(0));
    }

    #[test]
    fn original_destination_and_comm_render() {
        let mut r = ConnRecord {
            family: AF_INET,
            orig_addr: [u32::from_ne_bytes([169, 254, 169, 254]), 0, 0, 0],
            orig_port: 80,
            ..Default::default()
        };
        assert_eq!(original_dst(&r).to_string(), "169.254.169.254:80");
        r.family = metaproxy_common::AF_INET6;
        r.orig_addr = metaproxy_common::IMDS_IP6;
        assert_eq!(original_dst(&r).to_string(), "[fd00:ec2::254]:80");
        assert_eq!(comm(b"curl\0\0\0\0\0\0\0\0\0\0\0\0"), "curl");
        assert_eq!(comm(b"exactly16bytes!!"), "exactly16bytes!!");
    }
}
