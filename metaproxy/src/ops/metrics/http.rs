//! The metrics listener: `/metrics`, `/healthz`, `/readyz`, with a cap
//! on clients and on how long each may take.

use std::{
    convert::Infallible,
    future::Future,
    sync::{Arc, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::{Metrics, Readiness};
use crate::ops::{
    accept::{self, Rules, WhenFull},
    http::text,
};

/// How long a scraper may take to send its request.
pub(super) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Bounds on the metrics listener's clients. It shares the daemon's file
/// descriptors: unbounded, any local user could open enough connections to
/// make the IMDS listener's accept() fail with EMFILE.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// Connections served at once; more wait in the kernel's listen
    /// backlog (costing the daemon no descriptor) until one ends.
    pub max_connections: usize,
    /// How long one connection may last, however slowly its client reads
    /// or writes: then it is asked to finish its request and close, and is
    /// cut `grace` later.
    pub lifetime: Duration,
    pub grace: Duration,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            lifetime: Duration::from_secs(10),
            grace: Duration::from_secs(2),
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` resolves.
/// `metrics` is set once the daemon's parts exist; until then `/metrics` is
/// 503 too.
pub async fn run(
    listener: TcpListener,
    metrics: Arc<OnceLock<Metrics>>,
    readiness: Arc<Readiness>,
    shutdown: impl Future<Output = ()>,
) {
    serve(
        listener,
        metrics,
        readiness,
        ClientLimits::default(),
        shutdown,
    )
    .await;
}

/// [`run`] with explicit [`ClientLimits`].
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<OnceLock<Metrics>>,
    readiness: Arc<Readiness>,
    limits: ClientLimits,
    shutdown: impl Future<Output = ()>,
) {
    // A permit first, then accept: over the cap, clients wait in the
    // backlog rather than hold one of our descriptors.
    let rules = Rules {
        name: "metrics",
        permits: Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1))),
        when_full: WhenFull::Wait,
    };
    let tasks = accept::serve(listener, rules, shutdown, |stream, _, permit| {
        let (metrics, readiness) = (metrics.clone(), readiness.clone());
        async move {
            serve_client(stream, metrics, readiness, limits).await;
            drop(permit);
        }
    })
    .await;
    drop(tasks);
}

/// One metrics client, for at most its lifetime and grace.
pub(super) async fn serve_client(
    stream: tokio::net::TcpStream,
    metrics: Arc<OnceLock<Metrics>>,
    readiness: Arc<Readiness>,
    limits: ClientLimits,
) {
    let service = hyper::service::service_fn(move |req| {
        let (metrics, readiness) = (metrics.clone(), readiness.clone());
        async move {
            // Encoding walks the kernel maps: off the thread that serves
            // requests.
            let answer =
                tokio::task::spawn_blocking(move || answer(&req, metrics.get(), &readiness))
                    .await
                    .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "failed\n"));
            Ok::<_, Infallible>(answer)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(HEADER_TIMEOUT)
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = tokio::time::sleep(limits.lifetime) => {}
    }
    // Past its lifetime: finish the request under way, then close; a
    // client that will not read its answer is cut.
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(limits.grace, conn).await;
}

pub(super) fn answer<B>(
    req: &Request<B>,
    metrics: Option<&Metrics>,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match readiness.check() {
            Ok(()) => match readiness.gap_detail() {
                None => text(StatusCode::OK, "ready\n"),
                Some(gap) => text(StatusCode::OK, format!("ready; gap: {gap}\n")),
            },
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => match metrics {
            Some(m) => {
                let mut resp = text(StatusCode::OK, m.encode());
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                resp
            }
            None => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
