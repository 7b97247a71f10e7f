//! The accept loop: every connection the probe redirected arrives here, is
//! attributed to the process that opened it, and each request on it is
//! answered by the surface and recorded in the connection log.
//!
//! `run(listener, pipeline, shutdown)` serves any listener, so tests drive
//! the whole path in-process on `127.0.0.1:0`.
//!
//! Bounded: a global and a per-cgroup cap on open connections (the excess
//! is closed at once and counted), small buffers, and timeouts on headers
//! and idle keep-alive connections, so one job cannot starve the others.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::{
    addrs::{AddrPair, ClientAddr, ServerAddr},
    attribution::{Attribution, Caller},
    connlog::{ConnLog, Connection},
    ids::CgroupId,
    logging::Clean,
    metrics::RequestMetrics,
    ratelimit::RateLimit,
    surface::{Denial, Handled, Surface},
};

/// Refusals are logged at most this often per second: anything on the
/// host can open connections to the listen address, and must not be able
/// to fill the disk with our log.
static REFUSAL_LOG: RateLimit = RateLimit::new(10);

/// How long a client may take to send a request's headers, and how long an
/// idle keep-alive connection stays open.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// hyper's read buffer per connection (its minimum is 8 KiB): IMDS requests
/// are a few hundred bytes.
const READ_BUFFER: usize = 8 * 1024;
/// Unrecorded connections served (with their 403) at once; more are closed.
const UNATTRIBUTED: usize = 64;
/// Longest request path kept in the connection log.
const LOGGED_PATH: usize = 200;

/// Caps on open connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_cgroup: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_cgroup: 256,
        }
    }
}

/// Open connections, overall and per cgroup.
#[derive(Debug)]
pub struct ConnectionCount {
    limits: Limits,
    total: Arc<tokio::sync::Semaphore>,
    /// Connections the probe did not record (direct connects to the listen
    /// address) get their 403 from a small pool of their own, so they
    /// cannot take the permits of attributed connections.
    unattributed: tokio::sync::Semaphore,
    per_cgroup: Mutex<HashMap<CgroupId, usize>>,
}

impl ConnectionCount {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            total: Arc::new(tokio::sync::Semaphore::new(limits.max_connections)),
            unattributed: tokio::sync::Semaphore::new(UNATTRIBUTED.min(limits.max_connections)),
            per_cgroup: Mutex::new(HashMap::new()),
        }
    }

    fn enter(self: &Arc<Self>, cgroup: CgroupId) -> Option<CgroupSlot> {
        let mut map = self.per_cgroup.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(cgroup).or_insert(0);
        if *n >= self.limits.max_connections_per_cgroup {
            return None;
        }
        *n += 1;
        Some(CgroupSlot(self.clone(), cgroup))
    }

    /// The most connections any one cgroup has open.
    pub fn largest_per_cgroup(&self) -> usize {
        let map = self.per_cgroup.lock().unwrap_or_else(|e| e.into_inner());
        map.values().copied().max().unwrap_or(0)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.limits.max_connections - self.total.available_permits()
    }
}

/// One open connection of a cgroup; released on drop.
struct CgroupSlot(Arc<ConnectionCount>, CgroupId);

impl Drop for CgroupSlot {
    fn drop(&mut self) {
        let mut map = self.0.per_cgroup.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}
/// How long open connections get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// The request path, from accepted connection to answer.
#[derive(Debug)]
pub struct Pipeline {
    pub attribution: Attribution,
    pub surface: Surface,
    pub connections: Arc<ConnLog>,
    pub count: Arc<ConnectionCount>,
    pub metrics: RequestMetrics,
}

/// Serves `listener` until `shutdown` resolves. Connections already being
/// served are given a moment to finish.
pub async fn run(
    listener: TcpListener,
    pipeline: Arc<Pipeline>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Over the global cap: closed at once (dropping it).
                    let Ok(permit) = pipeline.count.total.clone().try_acquire_owned() else {
                        pipeline.metrics.shed.inc();
                        if let Some(suppressed) = REFUSAL_LOG.allow() {
                            tracing::warn!(client = %peer, suppressed, "too many open connections; closing");
                        }
                        continue;
                    };
                    let pipeline = pipeline.clone();
                    tasks.spawn(async move {
                        serve_connection(stream, pipeline).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "connection task failed");
                }
            }
            () = &mut shutdown => break,
        }
    }
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN, drain).await.is_err() {
        tracing::warn!("connections still open at shutdown were dropped");
    }
}

async fn serve_connection(stream: TcpStream, pipeline: Arc<Pipeline>) {
    let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else {
        return;
    };
    let pair = AddrPair::new(ClientAddr(peer), ServerAddr(local));
    let caller = match pipeline.attribution.attribute(&pair).await {
        Ok(caller) => caller,
        Err(e) => {
            pipeline.metrics.records_missing.inc();
            let Ok(_permit) = pipeline.count.unattributed.try_acquire() else {
                pipeline.metrics.shed.inc();
                return;
            };
            let denial = Denial::from(e);
            if let Some(suppressed) = REFUSAL_LOG.allow() {
                tracing::warn!(client = %peer, reason = %denial, suppressed, "refusing connection");
            }
            pipeline
                .connections
                .push(Connection::refused(peer, denial.reason()));
            let for_requests = pipeline.clone();
            // Boxed: the task of an idle connection stays small (hyper's
            // connection state is allocated only once it is needed).
            Box::pin(serve_http(stream, move |_req| {
                let (denial, pipeline) = (denial.clone(), for_requests.clone());
                async move {
                    pipeline.metrics.request(
                        "unattributed",
                        denial.outcome().as_str(),
                        Some(denial.kind()),
                    );
                    denial.response()
                }
            }))
            .await;
            return;
        }
    };
    let Some(_slot) = pipeline.count.enter(caller.cgroup) else {
        pipeline.metrics.shed.inc();
        if let Some(suppressed) = REFUSAL_LOG.allow() {
            tracing::warn!(client = %peer, cgroup_id = %caller.cgroup, suppressed, "too many open connections from one cgroup; closing");
        }
        return;
    };
    // Wait for the first bytes before hyper allocates its buffers: a
    // connection that has sent nothing costs a task and a socket, no more.
    // (`peek`, not `readable`: readiness can be reported before any data.)
    let mut first = [0u8; 1];
    match tokio::time::timeout(HEADER_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => return,
    }
    let caller = Arc::new(caller);
    tracing::debug!(
        client = %peer,
        cgroup_id = %caller.cgroup,
        cgroup = %Clean(caller.cgroup_path.as_deref().unwrap_or("?")),
        pid = caller.pid,
        "accepted connection"
    );
    Box::pin(serve_http(stream, move |req| {
        let (caller, pipeline) = (caller.clone(), pipeline.clone());
        async move {
            let request = logged_request(req.method(), req.uri().path());
            let handled = pipeline.surface.handle(req, &caller).await;
            let metrics = &pipeline.metrics;
            metrics.request(handled.route, handled.outcome().as_str(), handled.refusal());
            if let Some(remaining) = handled.served_remaining() {
                metrics.served_remaining.observe(remaining.as_secs_f64());
            }
            pipeline
                .connections
                .push(answered(&caller, request, &handled));
            handled.into_response()
        }
    }))
    .await;
}

async fn serve_http<F, Fut>(stream: TcpStream, handler: F)
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Send + 'static,
    Fut: Future<Output = hyper::Response<http_body_util::Full<bytes::Bytes>>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let fut = handler(req);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        // Slow or silent clients must not hold a task forever; this also
        // bounds how long an idle keep-alive connection waits.
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(READ_BUFFER)
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// `METHOD /path` for the connection log, the path cut to [`LOGGED_PATH`]
/// characters: a caller must not fill our memory with its paths.
fn logged_request(method: &hyper::Method, path: &str) -> String {
    match path.char_indices().nth(LOGGED_PATH) {
        Some((cut, _)) => format!("{method} {}...", &path[..cut]),
        None => format!("{method} {path}"),
    }
}

fn answered(caller: &Caller, request: String, handled: &Handled) -> Connection {
    let container = handled.container.as_deref();
    Connection {
        time: humantime::format_rfc3339_millis(caller.connected_at()).to_string(),
        client: caller.peer.0.to_string(),
        cgroup_id: Some(caller.cgroup.0),
        cgroup: caller.cgroup_path.as_deref().map(str::to_owned),
        pid: Some(caller.pid),
        comm: Some(caller.comm.clone()),
        original_dst: Some(caller.original_dst.to_string()),
        container_id: container.map(|c| c.id.to_string()),
        container: container.map(|c| c.name.clone()),
        role: handled.role.as_ref().map(|r| r.to_string()),
        request: Some(request),
        outcome: handled.outcome(),
        reason: handled.reason(),
    }
}
