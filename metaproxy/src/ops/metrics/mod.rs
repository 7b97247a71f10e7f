//! Prometheus metrics, and the health endpoints beside them, on a listener
//! of their own (`--metrics`, default `127.0.0.1:9169`) that never serves
//! credentials.
//!
//! Every metric is defined here, in one registry, so names, help texts and
//! label sets are in one place (and `ops` imports no stage). Each part of
//! the request path holds handles to its own (`prometheus-client` metrics
//! are shared handles) and counts through them; in-process tests read those
//! handles directly, and the daemon registers clones. Values that are state rather than
//! events (open connections, cache sizes, map occupancy) are read at scrape
//! time from a [`LiveSource`].
//!
//! Label values are bounded: routes, outcomes, refusal kinds, STS error
//! codes from a fixed list. Never a container id, a role or a path.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

use crate::ops::connlog::Outcome;

/// Where metrics are served unless `--metrics` says otherwise.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9169";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: RouteLabel,
    pub outcome: Outcome,
}

/// What a request was for, as the request counters name it.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum RouteLabel {
    Token,
    RoleListing,
    Credentials,
    IamInfo,
    Metadata,
    /// Any other path or method on IMDS (refused).
    Other,
    /// The container-credentials endpoint.
    ContainerCredentials,
    /// A host process's request passed to the real IMDS.
    Passthrough,
    /// A caller whose identity could not be settled.
    Unidentified,
    /// A connection the probe had no record of.
    Unattributed,
}

impl RouteLabel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::RoleListing => "role-listing",
            Self::Credentials => "credentials",
            Self::IamInfo => "iam-info",
            Self::Metadata => "metadata",
            Self::Other => "other",
            Self::ContainerCredentials => "container-credentials",
            Self::Passthrough => "passthrough",
            Self::Unidentified => "unidentified",
            Self::Unattributed => "unattributed",
        }
    }
}

impl EncodeLabelValue for RouteLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// What a credential cache lookup found.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Lookup {
    /// Fresh credentials.
    Hit,
    /// None: STS is asked.
    Miss,
    /// A recent STS failure, answered again.
    Failing,
}

impl EncodeLabelValue for Lookup {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Failing => "failing",
        })
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabels {
    pub result: Lookup,
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
    /// Connections closed unanswered: the path of answers to their
    /// container could not be pinned.
    pub unpinned: Counter,
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
            unpinned: Counter::default(),
            served_remaining: Histogram::new([
                300.0, 600.0, 900.0, 1200.0, 1800.0, 2400.0, 3000.0, 3600.0, 7200.0, 21600.0,
                43200.0,
            ]),
        }
    }
}

impl RequestMetrics {
    /// One answered request.
    pub fn request(&self, route: RouteLabel, outcome: Outcome, refusal: Option<&'static str>) {
        self.requests
            .get_or_create(&RequestLabels { route, outcome })
            .inc();
        if let Some(reason) = refusal {
            self.refusals.get_or_create(&ReasonLabels { reason }).inc();
        }
    }

    /// How many requests were answered on `route` with `outcome`.
    pub fn requests_of(&self, route: RouteLabel, outcome: Outcome) -> u64 {
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
            "metaproxy_connections_unpinned",
            "Connections closed unanswered because the path of answers to their container could not be pinned to its own port",
            self.unpinned.clone(),
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
    pub lookups: Family<LookupLabels, Counter>,
}

impl CacheMetrics {
    pub fn lookup(&self, result: Lookup) {
        self.lookups.get_or_create(&LookupLabels { result }).inc();
    }

    pub fn lookups_of(&self, result: Lookup) -> u64 {
        count(&self.lookups, &LookupLabels { result })
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
            "STS calls, by operation (AssumeRole and GetCallerIdentity with the daemon's credentials, AssumeRoleWithWebIdentity with a job's ID token)",
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

mod http;
mod live;
mod readiness;

pub use http::{run, serve, ClientLimits};
use live::LiveCollector;
pub use live::{Live, LiveSource};
pub use readiness::Readiness;

#[cfg(test)]
mod tests;
