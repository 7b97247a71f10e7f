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
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::{
    attribution::{Attribution, AttributionError},
    identity::{container_roots, is_nested, Identity},
    kernel::addrs::{AddrPair, ClientAddr, ServerAddr},
    model::caller::Via,
    ops::accept::{self, Rules, WhenFull},
    ops::connlog::{ConnLog, Entry},
    ops::logging::Clean,
    ops::metrics::RequestMetrics,
    ops::metrics::RouteLabel,
    ops::ratelimit::PerSource,
    surface::{Denial, Surface},
};

mod handback;
mod limits;

use handback::{answered, HandBack, InFlight};
pub use limits::{ConnectionCount, Limits, Share};

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

/// How long open connections get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// The request path, from accepted connection to answer.
#[derive(Debug)]
pub struct Pipeline {
    pub attribution: Attribution,
    /// Pins the wire path of the answers to a container before its first
    /// request is read.
    pub answers: Arc<dyn crate::kernel::wire::AnswerPath>,
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
    let for_shed = pipeline.clone();
    let rules = Rules {
        name: "imds",
        permits: pipeline.count.total.clone(),
        // Over the global cap: closed at once (dropping it).
        when_full: WhenFull::Shed(Box::new(move |stream: TcpStream, peer: &SocketAddr| {
            for_shed.metrics.shed.inc();
            // Its record would otherwise wait on its slot until the client
            // lets go of its socket: a job holding thousands of shed
            // connections would hold the slots every other job needs.
            if let Ok(local) = stream.local_addr() {
                for_shed
                    .attribution
                    .release(&AddrPair::new(ClientAddr(*peer), ServerAddr(local)));
            }
            if let Some(suppressed) = REFUSAL_LOG.allow(peer.ip()) {
                tracing::warn!(client = %peer, suppressed, "too many open connections; closing");
            }
        })),
    };
    let mut tasks = accept::serve(listener, rules, shutdown, |stream, peer, permit| {
        let pipeline = pipeline.clone();
        async move {
            serve_connection(stream, peer, pipeline).await;
            drop(permit);
        }
    })
    .await;
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN, drain).await.is_err() {
        tracing::warn!("connections still open at shutdown were dropped");
    }
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, pipeline: Arc<Pipeline>) {
    // Asked of every connection: the redirect sends each connect to a port
    // of its own (its slot), which the kernel steers to this one listener.
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let pair = AddrPair::new(ClientAddr(peer), ServerAddr(local));
    let caller = match pipeline.attribution.attribute(&pair).await {
        Ok(caller) => caller,
        Err(e) => return refuse_unattributed(stream, peer, e, &pipeline).await,
    };
    // Identified now to find its share (cached: the surface asks again
    // per request at no cost).
    let identity = pipeline.surface.identities.identify(&caller).await;
    let claimed = match caller.via {
        Via::Direct => Ok(()),
        // Found by its slot alone: it takes the record only if it comes
        // from an address of the record's (outermost) container, which
        // identify has checked of a container with addresses of its own.
        // A host process, or a container in the host's network namespace,
        // has no address a translated connection could prove itself by.
        // And only a nested cgroup's connect (Docker-in-Docker's inner
        // containers and build steps) is translated on its way out of the
        // outer container: a record of the container's own processes is
        // claimed by its own 4-tuple, never by a connection forged from
        // its address.
        Via::Translated { .. } => {
            let nested = |c: &crate::model::container::Container| {
                caller.cgroup_path.as_deref().is_some_and(|p| {
                    container_roots(p)
                        .first()
                        .is_some_and(|(_, root, _)| is_nested(p, root, c))
                })
            };
            let own = matches!(&identity, Ok(Identity::Container(c)) if c.addresses.is_some() && nested(c));
            if own {
                pipeline.attribution.claim(&caller)
            } else {
                Err(AttributionError::NotItsSlot)
            }
        }
        // The kernel has shown the relay serves the network namespace the
        // record's process connected from. Only a container's: a host
        // process behind a relay of its own (a rootless build step that
        // stayed in the runner's cgroup) is no allow-listed host service.
        Via::Relayed { .. } => {
            if matches!(&identity, Ok(Identity::Container(_))) {
                pipeline.attribution.claim(&caller)
            } else {
                Err(AttributionError::NotItsSlot)
            }
        }
    };
    if let Err(e) = claimed {
        return refuse_unattributed(stream, peer, e, &pipeline).await;
    }
    // A relay's connection is answered through this host's own stack to
    // the relay, never over a bridge: there is no wire path to pin.
    let on_a_wire = !matches!(caller.via, Via::Relayed { .. });
    if let (Ok(Identity::Container(c)), true) = (&identity, on_a_wire) {
        if let Err(why) = pipeline.answers.pin(caller.cgroup, peer.ip(), c).await {
            pipeline.metrics.unpinned.inc();
            if let Some(suppressed) = REFUSAL_LOG.allow(caller.cgroup) {
                tracing::warn!(client = %peer, container = %Clean(&c.name), reason = %Clean(&why), suppressed, "cannot pin the path of answers to this container; closing unanswered");
            }
            return;
        }
    }
    let share = Share::of(&identity);
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

/// Answers every request on a connection no caller could be found for with
/// the refusal, and closes it.
async fn refuse_unattributed(
    stream: TcpStream,
    peer: SocketAddr,
    e: AttributionError,
    pipeline: &Arc<Pipeline>,
) {
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

#[cfg(test)]
mod tests;
