//! The accept loop: every connection the probe redirected arrives here, is
//! attributed to the process that opened it, and each request on it is
//! answered by the surface and recorded in the connection log.
//!
//! `run(listener, pipeline, shutdown)` serves any listener, so tests drive
//! the whole path in-process on `127.0.0.1:0`.
//!
//! Bounded, so one job (or one local user) cannot starve the others:
//! * a global cap on open connections, and a share per job (gitlab-runner's
//!   job label, else the outermost container), with all host callers
//!   sharing one; the last eighth of the global cap is kept for shares
//!   that hold only a few connections, so a new job is always served. The
//!   excess is closed at once and counted;
//! * a connection serves at most [`MAX_REQUESTS`] requests and lives at
//!   most [`MAX_LIFETIME`] (a request every few seconds would otherwise
//!   keep its place forever);
//! * small buffers, and timeouts on headers and idle keep-alive
//!   connections.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::{
    attribution::{Attribution, Caller},
    identity::Identity,
    kernel::addrs::{AddrPair, ClientAddr, ServerAddr},
    model::ids::ContainerId,
    ops::connlog::{ConnLog, Entry},
    ops::logging::Clean,
    ops::metrics::RequestMetrics,
    ops::metrics::RouteLabel,
    ops::ratelimit::PerSource,
    surface::{Denial, Handled, Surface},
};

/// Refusals are logged at most this often per second: anything on the
/// host can open connections to the listen address, and must not be able
/// to fill the disk with our log.
static REFUSAL_LOG: PerSource = PerSource::new(5, 50);

/// How long a client may take to send a request's headers, and how long an
/// idle keep-alive connection stays open.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// hyper's read buffer per connection (its minimum is 8 KiB): IMDS requests
/// are a few hundred bytes.
const READ_BUFFER: usize = 8 * 1024;
/// Unrecorded connections served (with their 403) at once; more are closed.
const UNATTRIBUTED: usize = 64;
/// Requests one connection may carry before it is closed.
pub const MAX_REQUESTS: usize = 100;
/// How long one connection may live; it is closed after the request it is
/// serving then.
pub const MAX_LIFETIME: Duration = Duration::from_secs(60);
/// Connections any share may hold even when only the reserve is left.
const FLOOR: usize = 8;

/// Caps on open connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// Per [`Share`]: per job, per container outside a job, and for all
    /// host callers together (`--max-connections-per-container`).
    pub max_connections_per_cgroup: usize,
}

/// Whose budget a connection counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Share {
    /// A gitlab-runner job: its build container, its services and
    /// whatever else carries its job label.
    Job(Arc<str>),
    /// A container outside any job, by its outermost container.
    Container(ContainerId),
    /// Every process in no container, together: a host user can make
    /// cgroups (`systemd-run --user --scope`) but not jobs.
    Host,
    /// Callers whose identity could not be settled (they are refused).
    Unidentified,
}

impl Share {
    fn of(identity: &Result<Identity, crate::identity::IdentityError>) -> Self {
        match identity {
            Ok(Identity::Container(c)) => match c.job_id() {
                Some(job) => Share::Job(job.into()),
                None => Share::Container(c.id.clone()),
            },
            Ok(Identity::Host) => Share::Host,
            Err(_) => Share::Unidentified,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_cgroup: 256,
        }
    }
}

/// Open connections, overall and per [`Share`].
#[derive(Debug)]
pub struct ConnectionCount {
    limits: Limits,
    total: Arc<tokio::sync::Semaphore>,
    /// Connections the probe did not record (direct connects to the listen
    /// address) get their 403 from a small pool of their own, so they
    /// cannot take the permits of attributed connections.
    unattributed: tokio::sync::Semaphore,
    per_share: Mutex<HashMap<Share, usize>>,
}

impl ConnectionCount {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            total: Arc::new(tokio::sync::Semaphore::new(limits.max_connections)),
            unattributed: tokio::sync::Semaphore::new(UNATTRIBUTED.min(limits.max_connections)),
            per_share: Mutex::new(HashMap::new()),
        }
    }

    /// A place for one more connection of `share` (this connection already
    /// holds a global permit), if its share and the reserve allow.
    fn enter(self: &Arc<Self>, share: Share) -> Option<ShareSlot> {
        let open = self.open();
        let mut map = self.per_share.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.get(&share).copied().unwrap_or(0);
        if !admits(self.limits, open, n) {
            return None;
        }
        map.insert(share.clone(), n + 1);
        Some(ShareSlot(self.clone(), share))
    }

    /// The most connections any one share has open.
    pub fn largest_per_cgroup(&self) -> usize {
        let map = self.per_share.lock().unwrap_or_else(|e| e.into_inner());
        map.values().copied().max().unwrap_or(0)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.limits.max_connections - self.total.available_permits()
    }
}

/// Whether a share holding `held` connections may open one more, with
/// `open` connections open in all (this one included): within its share,
/// and, once only the reserve (the last eighth) is left, only while it
/// holds fewer than [`FLOOR`].
fn admits(limits: Limits, open: usize, held: usize) -> bool {
    if held >= limits.max_connections_per_cgroup {
        return false;
    }
    let reserve = limits.max_connections / 8;
    open <= limits.max_connections - reserve || held < FLOOR
}

/// One open connection of a share; released on drop.
struct ShareSlot(Arc<ConnectionCount>, Share);

impl Drop for ShareSlot {
    fn drop(&mut self) {
        let mut map = self.0.per_share.lock().unwrap_or_else(|e| e.into_inner());
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
    // Connections arrive at the listener's own address, unless it listens
    // on every address; then each one is asked.
    let local = listener
        .local_addr()
        .ok()
        .filter(|a| !a.ip().is_unspecified());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Over the global cap: closed at once (dropping it).
                    let Ok(permit) = pipeline.count.total.clone().try_acquire_owned() else {
                        pipeline.metrics.shed.inc();
                        if let Some(suppressed) = REFUSAL_LOG.allow(peer.ip()) {
                            tracing::warn!(client = %peer, suppressed, "too many open connections; closing");
                        }
                        continue;
                    };
                    let pipeline = pipeline.clone();
                    tasks.spawn(async move {
                        serve_connection(stream, peer, local, pipeline).await;
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

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    pipeline: Arc<Pipeline>,
) {
    let Some(local) = local.or_else(|| stream.local_addr().ok()) else {
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
            if let Some(suppressed) = REFUSAL_LOG.allow(peer.ip()) {
                tracing::warn!(client = %peer, reason = %denial, suppressed, "refusing connection");
            }
            pipeline
                .connections
                .push(Entry::refused(peer, denial.reason()));
            let for_requests = pipeline.clone();
            serve_http(stream, move |_req| {
                let (denial, pipeline) = (denial.clone(), for_requests.clone());
                async move {
                    pipeline.metrics.request(
                        RouteLabel::Unattributed,
                        denial.outcome(),
                        Some(denial.kind()),
                    );
                    denial.response()
                }
            })
            .await;
            return;
        }
    };
    // Identified now to find its share (cached: the surface asks again
    // per request at no cost).
    let share = Share::of(&pipeline.surface.identities.identify(&caller).await);
    let Some(_slot) = pipeline.count.enter(share.clone()) else {
        pipeline.metrics.shed.inc();
        if let Some(suppressed) = REFUSAL_LOG.allow(caller.cgroup) {
            tracing::warn!(client = %peer, cgroup_id = %caller.cgroup, share = ?share, suppressed, "too many open connections from one job or share; closing");
        }
        return;
    };
    let caller = Arc::new(caller);
    tracing::debug!(
        client = %peer,
        cgroup_id = %caller.cgroup,
        cgroup = %Clean(caller.cgroup_path.as_deref().unwrap_or("?")),
        pid = caller.pid,
        "accepted connection"
    );
    serve_http(stream, move |req| {
        let (caller, pipeline) = (caller.clone(), pipeline.clone());
        async move {
            // Kept for the log: the request itself goes to the surface.
            let (method, uri) = (req.method().clone(), req.uri().clone());
            let handled = pipeline.surface.handle(req, &caller).await;
            let metrics = &pipeline.metrics;
            metrics.request(handled.route, handled.outcome(), handled.refusal());
            if let Some(remaining) = handled.served_remaining() {
                metrics.served_remaining.observe(remaining.as_secs_f64());
            }
            pipeline
                .connections
                .push(answered(&caller, &method, uri.path(), &handled));
            handled.into_response()
        }
    })
    .await;
}

/// Serves HTTP/1.1 on `stream`, request after request, holding hyper's
/// buffers only while a request is being read or answered.
///
/// A connection costs a task and a socket until its first bytes arrive
/// (`peek`, not `readable`: readiness can be reported before any data,
/// and a silent connection would then hold hyper's buffers). Then hyper serves it until a response has been flushed
/// and nothing more is waiting ([`HandBack`]); the connection goes back to
/// waiting, and the next request gets a fresh hyper connection. Silent connections, and
/// keep-alive ones between requests, wait at most [`HEADER_TIMEOUT`].
async fn serve_http<F, Fut>(mut stream: TcpStream, handler: F)
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = hyper::Response<http_body_util::Full<bytes::Bytes>>> + Send + 'static,
{
    let born = tokio::time::Instant::now();
    let served = Arc::new(AtomicUsize::new(0));
    loop {
        if served.load(Ordering::Relaxed) >= MAX_REQUESTS || born.elapsed() >= MAX_LIFETIME {
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
            return;
        }
        let mut first = [0u8; 1];
        match tokio::time::timeout(HEADER_TIMEOUT, stream.peek(&mut first)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
        let io = HandBack::new(stream);
        let (handler, in_flight) = (handler.clone(), io.in_flight.clone());
        let counted = served.clone();
        let service = hyper::service::service_fn(move |req| {
            counted.fetch_add(1, Ordering::Relaxed);
            let answering = InFlight::enter(&in_flight);
            let fut = handler(req);
            async move {
                let response = fut.await;
                drop(answering);
                Ok::<_, Infallible>(response)
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            // Slow clients must not hold a task forever.
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(READ_BUFFER)
            .timer(hyper_util::rt::TokioTimer::new())
            .serve_connection(TokioIo::new(io), service)
            .without_shutdown();
        // Boxed: the waiting connection's task stays small; hyper's state
        // exists only while it serves.
        match Box::pin(conn).await {
            Ok(parts) if parts.read_buf.is_empty() => {
                match parts.io.into_inner().waiting_again() {
                    Ok(again) => stream = again,
                    // The client closed, or asked us to (`Connection:
                    // close`, HTTP/1.0): hyper has answered and is done.
                    // Shut down before closing, as hyper and nginx do: the
                    // client waits for the FIN, and a bare close sends it
                    // later.
                    Err(mut done) => {
                        let _ = tokio::io::AsyncWriteExt::shutdown(&mut done).await;
                        return;
                    }
                }
            }
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(error = %e, "connection ended with an error");
                return;
            }
        }
    }
}

/// The socket under hyper, taken back from it between requests.
///
/// hyper holds a read and a write buffer (8 KiB each) for as long as it
/// serves a connection, so a keep-alive connection waiting for its next
/// request would keep them. When hyper asks for more bytes and the socket
/// has none, and everything it was given has been answered, this reports
/// end-of-stream: to hyper that is a client closing an idle connection,
/// which ends it cleanly (under `without_shutdown`, the socket untouched).
/// Bytes that arrive later wait in the socket for the next round.
///
/// "Everything answered" is: no request in the service, a response flushed
/// since the last bytes were read, and those bytes ending a request head
/// (`\r\n\r\n`). So a request arriving in pieces, a body still to come,
/// or a pipelined request hyper holds in its buffer all pass through
/// unchanged; at worst a connection keeps hyper's buffers, as it would
/// without this.
struct HandBack {
    stream: TcpStream,
    /// Requests handed to the service and not yet answered.
    in_flight: Arc<AtomicUsize>,
    /// The last bytes read.
    tail: [u8; 4],
    /// Bytes were written since the last flush.
    wrote: bool,
    /// A response was flushed and nothing has been read since.
    flushed: bool,
    /// End-of-stream was reported by us, not by the client.
    handed_back: bool,
}

impl HandBack {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            in_flight: Arc::default(),
            tail: [0; 4],
            wrote: false,
            flushed: false,
            handed_back: false,
        }
    }

    fn answered_all(&self) -> bool {
        self.flushed && &self.tail == b"\r\n\r\n" && self.in_flight.load(Ordering::Acquire) == 0
    }

    /// The socket: `Ok` if hyper ended because we handed it back, `Err` if
    /// the client closed or the connection was not to be kept.
    fn waiting_again(self) -> Result<TcpStream, TcpStream> {
        if self.handed_back {
            Ok(self.stream)
        } else {
            Err(self.stream)
        }
    }
}

/// One request in the service, counted until its response is ready.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl tokio::io::AsyncRead for HandBack {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Pending if this.answered_all() => {
                this.handed_back = true;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                let read = &buf.filled()[before..];
                for &b in &read[read.len().saturating_sub(4)..] {
                    this.tail.rotate_left(1);
                    this.tail[3] = b;
                }
                this.flushed = false;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl tokio::io::AsyncWrite for HandBack {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.wrote |= matches!(written, Poll::Ready(Ok(n)) if n > 0);
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.wrote |= matches!(written, Poll::Ready(Ok(n)) if n > 0);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let flushed = Pin::new(&mut this.stream).poll_flush(cx);
        if matches!(flushed, Poll::Ready(Ok(()))) && this.wrote {
            this.wrote = false;
            this.flushed = true;
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

fn answered(caller: &Arc<Caller>, method: &hyper::Method, path: &str, handled: &Handled) -> Entry {
    Entry::answered(
        caller,
        method,
        path,
        handled
            .container
            .as_deref()
            .map(|c| (&c.id, c.name.as_str())),
        handled.role.as_ref(),
        handled.outcome(),
        handled.reason(),
    )
}

#[cfg(test)]
mod tests;
