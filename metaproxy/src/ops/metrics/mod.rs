//! Prometheus metrics, and the health endpoints beside them, on a listener
//! of their own (`--metrics`, default `127.0.0.1:9169`) that never serves
//! credentials.
//!
//! Each part of the request path owns its counters (`prometheus-client`
//! metrics are shared handles), so in-process tests read them directly and
//! the daemon registers clones here. Values that are state rather than
//! events (open connections, cache sizes, map occupancy) are read at scrape
//! time from a [`LiveSource`].
//!
//! Label values are bounded: routes, outcomes, refusal kinds, STS error
//! codes from a fixed list. Never a container id, a role or a path.

use std::{
    convert::Infallible,
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, OnceLock,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::model::ids::AccountId;

/// Where metrics are served unless `--metrics` says otherwise.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9169";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub operation: &'static str,
    pub code: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// A counter's value for `labels`; 0 if it never counted.
fn count<L>(family: &Family<L, Counter>, labels: &L) -> u64
where
    L: Clone + std::hash::Hash + Eq,
{
    family.get(labels).map_or(0, |c| c.get())
}

fn sts_buckets() -> Histogram {
    // 5 ms .. ~10 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 12))
}

/// Requests and refusals on the IMDS listener.
#[derive(Debug, Clone)]
pub struct RequestMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub refusals: Family<ReasonLabels, Counter>,
    /// Connections closed at once for being over a cap.
    pub shed: Counter,
    /// Connections the probe had no record of.
    pub records_missing: Counter,
    /// Remaining lifetime of the credentials each answer carried.
    pub served_remaining: Histogram,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            refusals: Family::default(),
            shed: Counter::default(),
            records_missing: Counter::default(),
            served_remaining: Histogram::new([
                300.0, 600.0, 900.0, 1200.0, 1800.0, 2400.0, 3000.0, 3600.0, 7200.0, 21600.0,
                43200.0,
            ]),
        }
    }
}

impl RequestMetrics {
    /// One answered request.
    pub fn request(
        &self,
        route: &'static str,
        outcome: &'static str,
        refusal: Option<&'static str>,
    ) {
        self.requests
            .get_or_create(&RequestLabels { route, outcome })
            .inc();
        if let Some(reason) = refusal {
            self.refusals.get_or_create(&ReasonLabels { reason }).inc();
        }
    }

    /// How many requests were answered on `route` with `outcome`.
    pub fn requests_of(&self, route: &'static str, outcome: &'static str) -> u64 {
        count(&self.requests, &RequestLabels { route, outcome })
    }

    /// How many requests were refused for `reason`.
    pub fn refusals_of(&self, reason: &'static str) -> u64 {
        count(&self.refusals, &ReasonLabels { reason })
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "metaproxy_requests",
            "Requests answered on the IMDS listener, by route and outcome",
            self.requests.clone(),
        );
        r.register(
            "metaproxy_refusals",
            "Requests refused, by reason",
            self.refusals.clone(),
        );
        r.register(
            "metaproxy_connections_shed",
            "Connections closed at once for being over --max-connections or --max-connections-per-container",
            self.shed.clone(),
        );
        r.register(
            "metaproxy_probe_records_missing",
            "Connections the probe had no record of (direct connects to the listen address)",
            self.records_missing.clone(),
        );
        r.register(
            "metaproxy_served_credentials_remaining_seconds",
            "Remaining lifetime of the credentials served, at the time they were served",
            self.served_remaining.clone(),
        );
    }
}

/// The credential cache's lookups.
#[derive(Debug, Clone, Default)]
pub struct CacheMetrics {
    /// `hit`, `miss` (STS asked), `failing` (a recent STS failure answered).
    pub lookups: Family<ResultLabels, Counter>,
}

impl CacheMetrics {
    pub fn lookup(&self, result: &'static str) {
        self.lookups.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn lookups_of(&self, result: &'static str) -> u64 {
        count(&self.lookups, &ResultLabels { result })
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "metaproxy_credential_cache_lookups",
            "Credential cache lookups by result: hit, miss (STS asked) or failing (a recent STS failure returned)",
            self.lookups.clone(),
        );
    }
}

/// Calls to STS.
#[derive(Debug, Clone)]
pub struct StsMetrics {
    pub calls: Family<OperationLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Histograms<OperationLabels>,
    pub in_flight: Gauge,
}

impl Default for StsMetrics {
    fn default() -> Self {
        Self {
            calls: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(sts_buckets),
            in_flight: Gauge::default(),
        }
    }
}

impl StsMetrics {
    pub fn calls_of(&self, operation: &'static str) -> u64 {
        count(&self.calls, &OperationLabels { operation })
    }

    pub fn errors_of(&self, operation: &'static str, code: &'static str) -> u64 {
        count(&self.errors, &ErrorLabels { operation, code })
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "metaproxy_sts_calls",
            "STS calls made with the instance's credentials, by operation",
            self.calls.clone(),
        );
        r.register(
            "metaproxy_sts_errors",
            "STS calls that failed, by operation and STS error code (none: no answer)",
            self.errors.clone(),
        );
        r.register(
            "metaproxy_sts_call_duration_seconds",
            "How long STS calls took",
            self.duration.clone(),
        );
        r.register(
            "metaproxy_sts_calls_in_flight",
            "STS calls under way",
            self.in_flight.clone(),
        );
    }
}

/// Calls to the container runtime's API.
#[derive(Debug, Clone, Default)]
pub struct DockerMetrics {
    pub calls: Family<OperationLabels, Counter>,
    pub errors: Family<OperationLabels, Counter>,
}

impl DockerMetrics {
    pub fn call(&self, operation: &'static str, ok: bool) {
        let labels = OperationLabels { operation };
        self.calls.get_or_create(&labels).inc();
        if !ok {
            self.errors.get_or_create(&labels).inc();
        }
    }

    /// A failure after the call itself succeeded (a stream that broke).
    pub fn error(&self, operation: &'static str) {
        self.errors
            .get_or_create(&OperationLabels { operation })
            .inc();
    }

    pub fn calls_of(&self, operation: &'static str) -> u64 {
        count(&self.calls, &OperationLabels { operation })
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "metaproxy_docker_calls",
            "Docker API calls, by operation",
            self.calls.clone(),
        );
        r.register(
            "metaproxy_docker_errors",
            "Docker API calls that failed, by operation",
            self.errors.clone(),
        );
    }
}

/// State read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Live {
    pub open_connections: u64,
    pub largest_per_container: u64,
    pub identity_cache: u64,
    pub credential_cache: u64,
    pub map_pending: u64,
    pub map_conns: u64,
    pub probe_generation: u64,
    pub log_lines_dropped: u64,
    pub docker_reachable: bool,
    /// Packets the packet guard dropped, by [`metaproxy_common::GuardDrop`].
    pub guard_drops: [u64; metaproxy_common::GUARD_DROP_KINDS as usize],
    /// Interfaces the tc guard is attached to.
    pub guard_interfaces: u64,
}

/// Where [`Live`] comes from (the daemon's parts; a fixed value in tests).
pub trait LiveSource: Send + Sync + 'static {
    fn live(&self) -> Live;
}

struct LiveCollector(Arc<dyn LiveSource>);

impl std::fmt::Debug for LiveCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveCollector")
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: &[(Option<(&str, &str)>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (label, value) in values {
        let value = ConstGauge::new(i64::try_from(*value).unwrap_or(i64::MAX));
        match label {
            Some(label) => value.encode(family.encode_family(&[*label])?)?,
            None => return value.encode(family),
        }
    }
    Ok(())
}

impl Collector for LiveCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let live = self.0.live();
        gauge(
            &mut encoder,
            "metaproxy_open_connections",
            "Connections open on the IMDS listener",
            &[(None, live.open_connections)],
        )?;
        gauge(
            &mut encoder,
            "metaproxy_open_connections_largest_per_container",
            "The most connections any one container (cgroup) has open",
            &[(None, live.largest_per_container)],
        )?;
        gauge(
            &mut encoder,
            "metaproxy_identity_cache_entries",
            "Cgroups whose identity (container or host) is cached",
            &[(None, live.identity_cache)],
        )?;
        gauge(
            &mut encoder,
            "metaproxy_credential_cache_entries",
            "Role sessions whose credentials are cached",
            &[(None, live.credential_cache)],
        )?;
        gauge(
            &mut encoder,
            "metaproxy_probe_map_entries",
            "Entries in the probe's kernel maps",
            &[
                (Some(("map", "pending")), live.map_pending),
                (Some(("map", "conns")), live.map_conns),
            ],
        )?;
        gauge(
            &mut encoder,
            "metaproxy_probe_map_capacity",
            "Capacity of the probe's kernel maps",
            &[
                (
                    Some(("map", "pending")),
                    u64::from(metaproxy_common::PENDING_CAPACITY),
                ),
                (
                    Some(("map", "conns")),
                    u64::from(metaproxy_common::CONNS_CAPACITY),
                ),
            ],
        )?;
        gauge(
            &mut encoder,
            "metaproxy_probe_generation",
            "Generation of the attached probe (grows with each daemon start)",
            &[(None, live.probe_generation)],
        )?;
        gauge(
            &mut encoder,
            "metaproxy_docker_reachable",
            "1 while the Docker API answers (its event stream is connected)",
            &[(None, u64::from(live.docker_reachable))],
        )?;
        gauge(
            &mut encoder,
            "metaproxy_guard_interfaces",
            "Interfaces the packet guard is attached to (those that route to IMDS)",
            &[(None, live.guard_interfaces)],
        )?;
        {
            let mut family = encoder.encode_descriptor(
                "metaproxy_guard_dropped_packets",
                "Packets to IMDS or the container-credentials addresses that the packet guard dropped, by kind",
                None,
                MetricType::Counter,
            )?;
            for kind in metaproxy_common::GuardDrop::ALL {
                ConstCounter::new(live.guard_drops[kind as usize])
                    .encode(family.encode_family(&[("kind", kind.name())])?)?;
            }
        }
        let dropped = ConstCounter::new(live.log_lines_dropped);
        let family = encoder.encode_descriptor(
            "metaproxy_log_lines_dropped",
            "Log lines (audit lines included) dropped because the writer fell behind",
            None,
            dropped.metric_type(),
        )?;
        dropped.encode(family)?;
        Ok(())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Everything the `/metrics` endpoint shows.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new(
        requests: &RequestMetrics,
        cache: &CacheMetrics,
        sts: &StsMetrics,
        docker: &DockerMetrics,
        live: Arc<dyn LiveSource>,
    ) -> Self {
        let mut registry = Registry::default();
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("metaproxy_build_info", "The running build", build);
        requests.register(&mut registry);
        cache.register(&mut registry);
        sts.register(&mut registry);
        docker.register(&mut registry);
        registry.register_collector(Box::new(LiveCollector(live)));
        Self { registry }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Whether the whole request path works; each step is set as it comes up.
#[derive(Default)]
pub struct Readiness {
    attached: AtomicBool,
    guarded: OnceLock<Arc<dyn Fn() -> bool + Send + Sync>>,
    listening: AtomicBool,
    docker: OnceLock<Arc<dyn Fn() -> bool + Send + Sync>>,
    account: OnceLock<Arc<OnceLock<AccountId>>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("ready", &self.check())
            .finish()
    }
}

impl Readiness {
    pub fn probe_attached(&self) {
        self.attached.store(true, Ordering::Relaxed);
    }

    pub fn listening(&self) {
        self.listening.store(true, Ordering::Relaxed);
    }

    /// How to tell whether the packet guard is on every interface that
    /// routes to a guarded address.
    pub fn guard(&self, in_place: Arc<dyn Fn() -> bool + Send + Sync>) {
        let _ = self.guarded.set(in_place);
    }

    /// How to tell whether the Docker API is reachable.
    pub fn docker(&self, reachable: Arc<dyn Fn() -> bool + Send + Sync>) {
        let _ = self.docker.set(reachable);
    }

    /// The daemon's own account, set once its credentials have worked.
    pub fn own_credentials(&self, account: Arc<OnceLock<AccountId>>) {
        let _ = self.account.set(account);
    }

    /// `Ok` when ready; otherwise the first thing missing, in start order.
    pub fn check(&self) -> Result<(), &'static str> {
        if !self.attached.load(Ordering::Relaxed) {
            return Err("the probe is not attached yet");
        }
        if !self.guarded.get().is_some_and(|on| on()) {
            return Err("the packet guard is not on the interface that routes to IMDS");
        }
        if !self.listening.load(Ordering::Relaxed) {
            return Err("the IMDS listener is not bound yet");
        }
        if !self.docker.get().is_some_and(|up| up()) {
            return Err("the Docker API is not reachable");
        }
        if self.account.get().is_none_or(|a| a.get().is_none()) {
            return Err("the daemon's own AWS credentials have not worked yet (GetCallerIdentity)");
        }
        Ok(())
    }
}

/// How long a scraper may take to send its request.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

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
    tokio::pin!(shutdown);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        // A slot first, then accept: over the cap, clients wait in the
        // backlog rather than hold one of our descriptors.
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("never closed"),
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            () = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (metrics, readiness) = (metrics.clone(), readiness.clone());
                    tasks.spawn(async move {
                        serve_client(stream, metrics, readiness, limits).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    if let Some(suppressed) = ACCEPT_FAILURE_LOG.allow() {
                        tracing::warn!(error = %e, suppressed, "metrics: accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
}

/// Accept failures (EMFILE and friends) are logged at most this often.
static ACCEPT_FAILURE_LOG: crate::ops::ratelimit::RateLimit =
    crate::ops::ratelimit::RateLimit::new(1);

/// One metrics client, for at most its lifetime and grace.
async fn serve_client(
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
                    .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "failed\n".into()));
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

fn answer<B>(
    req: &Request<B>,
    metrics: Option<&Metrics>,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match readiness.check() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
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
            None => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n".into()),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// STS error codes kept as label values; anything else is `other`, so a
/// label never takes an unbounded value.
pub fn sts_error_code(code: Option<&str>) -> &'static str {
    const KNOWN: &[&str] = &[
        "AccessDenied",
        "ExpiredToken",
        "ExpiredTokenException",
        "IDPCommunicationError",
        "InvalidClientTokenId",
        "InvalidIdentityToken",
        "InvalidParameterValue",
        "MalformedPolicyDocument",
        "PackedPolicyTooLarge",
        "RegionDisabledException",
        "RequestExpired",
        "ServiceUnavailable",
        "SignatureDoesNotMatch",
        "Throttling",
        "ThrottlingException",
        "ValidationError",
    ];
    match code {
        None => "none",
        Some(code) => KNOWN
            .iter()
            .find(|k| **k == code)
            .copied()
            .unwrap_or("other"),
    }
}

#[cfg(test)]
mod tests;
