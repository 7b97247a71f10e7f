//! The accept loop: every connection the probe redirected arrives here, is
//! attributed to the process that opened it, and each request on it is
//! answered by the surface and recorded in the connection log.
//!
//! `run(listener, pipeline, shutdown)` serves any listener, so tests drive
//! the whole path in-process on `127.0.0.1:0`.

use std::{convert::Infallible, future::Future, sync::Arc, time::Duration};

use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::{
    addrs::{AddrPair, ClientAddr, ServerAddr},
    attribution::{Attribution, Caller},
    connlog::{ConnLog, Connection},
    logging::Clean,
    ratelimit::RateLimit,
    surface::{Denial, Handled, Surface},
};

/// Refusals are logged at most this often per second: anything on the
/// host can open connections to the listen address, and must not be able
/// to fill the disk with our log.
static REFUSAL_LOG: RateLimit = RateLimit::new(10);

/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long open connections get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// The request path, from accepted connection to answer.
#[derive(Debug)]
pub struct Pipeline {
    pub attribution: Attribution,
    pub surface: Surface,
    pub connections: Arc<ConnLog>,
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
                Ok((stream, _)) => {
                    tasks.spawn(serve_connection(stream, pipeline.clone()));
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
        Ok(caller) => Arc::new(caller),
        Err(e) => {
            let denial = Denial::from(e);
            if let Some(suppressed) = REFUSAL_LOG.allow() {
                tracing::warn!(client = %peer, reason = %denial, suppressed, "refusing connection");
            }
            pipeline
                .connections
                .push(Connection::refused(peer, denial.reason()));
            serve_http(stream, move |_req| {
                let denial = denial.clone();
                async move { denial.response() }
            })
            .await;
            return;
        }
    };
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
            let request = format!("{} {}", req.method(), req.uri().path());
            let handled = pipeline.surface.handle(req, &caller).await;
            pipeline
                .connections
                .push(answered(&caller, request, &handled));
            handled.into_response()
        }
    })
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
        // Slow or silent clients must not hold a task forever.
        .header_read_timeout(HEADER_TIMEOUT)
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "connection ended with an error");
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
