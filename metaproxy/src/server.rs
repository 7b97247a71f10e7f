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
    addrs::{AddrPair, ClientAddr, ServerAddr},
    attribution::{Attribution, Caller},
    connlog::{ConnLog, Entry},
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
                        if let Some(suppressed) = REFUSAL_LOG.allow() {
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
            if let Some(suppressed) = REFUSAL_LOG.allow() {
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
                        "unattributed",
                        denial.outcome().as_str(),
                        Some(denial.kind()),
                    );
                    denial.response()
                }
            })
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
            metrics.request(handled.route, handled.outcome().as_str(), handled.refusal());
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
/// and the bench's silent connections then hold hyper's buffers, about
/// 13 KiB each). Then hyper serves it until a response has been flushed
/// and nothing more is waiting ([`HandBack`]); the connection goes back to
/// waiting, and the next request gets a fresh hyper connection. Silent connections, and
/// keep-alive ones between requests, wait at most [`HEADER_TIMEOUT`].
async fn serve_http<F, Fut>(mut stream: TcpStream, handler: F)
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = hyper::Response<http_body_util::Full<bytes::Bytes>>> + Send + 'static,
{
    loop {
        let mut first = [0u8; 1];
        match tokio::time::timeout(HEADER_TIMEOUT, stream.peek(&mut first)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
        let io = HandBack::new(stream);
        let (handler, in_flight) = (handler.clone(), io.in_flight.clone());
        let service = hyper::service::service_fn(move |req| {
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
                    // The FIN goes out first, as hyper and nginx send it:
                    // a bare close sends it too, but on this VM it took
                    // more than twice as long (perf trace, per connection:
                    // 74 us for close against 17 us for shutdown and 12 us
                    // for the close after it), and the client waits for
                    // that FIN.
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
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn pair() -> (HandBack, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (HandBack::new(server), client)
    }

    /// What a read on the server side does now: `Some(n)` bytes (0 is
    /// end-of-stream), `None` if it waits.
    async fn read_now(io: &mut HandBack) -> Option<usize> {
        let mut buf = [0u8; 256];
        tokio::time::timeout(Duration::from_millis(100), io.read(&mut buf))
            .await
            .ok()
            .map(Result::unwrap)
    }

    async fn answer(io: &mut HandBack) {
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        io.flush().await.unwrap();
    }

    #[tokio::test]
    async fn hands_back_only_once_everything_read_is_answered() {
        let (mut io, mut client) = pair().await;
        // Nothing read or answered yet: a read waits.
        assert_eq!(read_now(&mut io).await, None);
        // A whole head, answered: the next read is handed back.
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(read_now(&mut io).await, Some(18));
        let answering = InFlight::enter(&io.in_flight);
        // Still in the service: a read waits, even after a flush (an
        // interim answer).
        answer(&mut io).await;
        assert_eq!(read_now(&mut io).await, None);
        drop(answering);
        answer(&mut io).await;
        assert_eq!(read_now(&mut io).await, Some(0));
        assert!(io.handed_back);
    }

    #[tokio::test]
    async fn a_head_in_pieces_or_a_body_to_come_is_waited_for() {
        let (mut io, mut client) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(read_now(&mut io).await, Some(18));
        answer(&mut io).await;
        // The next request's first bytes arrive; the rest has not.
        client.write_all(b"GET / HT").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(read_now(&mut io).await, Some(8));
        answer(&mut io).await;
        assert_eq!(read_now(&mut io).await, None);
        // A head whose body is still to come.
        client
            .write_all(b"TP/1.1\r\n\r\nPUT / HTTP/1.1\r\ncontent-length: 2\r\n\r\nx")
            .await
            .unwrap();
        assert!(read_now(&mut io).await.unwrap() > 0);
        answer(&mut io).await;
        assert_eq!(read_now(&mut io).await, None);
        assert!(!io.handed_back);
        // A client that closes is end-of-stream of its own.
        client.shutdown().await.unwrap();
        assert_eq!(read_now(&mut io).await, Some(0));
        assert!(io.waiting_again().is_err());
    }
}
