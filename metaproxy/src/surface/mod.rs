//! The HTTP surface that intercepted callers see: the last step of the
//! request path. It takes a request and the [`Caller`] behind it, asks
//! identity, policy and credentials in that order, and renders the answer.
//!
//! * A container gets exactly what IMDS would give an instance whose profile
//!   is the container's role: IMDSv2 tokens (bound to the container), the
//!   role listing and its credentials, a short allow-list of non-secret
//!   metadata. Everything else (user-data, identity credentials, unknown or
//!   odd paths) is 404 and never forwarded.
//! * A host process (in no container) is passed through to the real IMDS
//!   unchanged, where policy allows it.
//!
//! Every refusal is a [`Denial`], which alone decides its status code.

pub mod render;
pub mod upstream;

mod container_credentials;
mod denial;
mod document;
mod imdsv1;
mod routes;
mod token;

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Body, header, Request, Response};

pub use container_credentials::{AuthFailure, ContainerCredentialsOptions, NotEnabled, OPT_IN};
pub use denial::Denial;
pub use document::imds_time;
use document::CredentialsDocument;
pub use imdsv1::{Imdsv1Gate, Imdsv1Mode};
pub use routes::{Route, TOKEN_HEADER, TOKEN_PATH, TTL_HEADER};
pub use token::{TokenError, TokenKey};

use crate::{
    credentials::{CredKey, CredentialCache, IdTokenKey, Issued},
    identity::{Identities, Identity},
    model::caller::Caller,
    model::container::Container,
    model::ids::RoleArn,
    ops::connlog::Outcome,
    ops::logging::Clean,
    ops::metrics::RouteLabel,
    ops::ratelimit::PerSource,
    policy::{Policy, Role, RoleDecision},
    surface::render::{Rendering, Served as _},
    surface::upstream::{Upstream, MAX_BODY},
};

/// How long a request waits for credentials that are not cached: under the
/// SDKs' IMDS timeouts (aws-config and botocore give 1 s).
const CREDENTIALS_WAIT: Duration = Duration::from_millis(800);
/// How long a host process may take to send its request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(2);

/// Refusals are logged a few times a second per cgroup or container, and
/// a bounded number for all: a job must not drown another's lines, nor
/// fill the disk.
static REFUSAL_LOG: PerSource = PerSource::new(5, 50);

#[derive(Debug, Clone)]
pub struct SurfaceOptions {
    /// Whether containers may send requests without a token (IMDSv1).
    pub imdsv1: Arc<Imdsv1Gate>,
    pub container_credentials: ContainerCredentialsOptions,
}

/// Which service the caller meant to reach, from its original destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The instance metadata service, 169.254.169.254 or fd00:ec2::254.
    Imds,
    /// The container-credentials endpoint (169.254.170.2, 169.254.170.23,
    /// fd00:ec2::23): anything else the probe redirects.
    ContainerCredentials,
}

impl Endpoint {
    pub fn of(original_dst: std::net::SocketAddr) -> Self {
        let imds4 = std::net::Ipv4Addr::new(169, 254, 169, 254);
        let imds6 = std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
        match original_dst.ip().to_canonical() {
            std::net::IpAddr::V4(ip) if ip == imds4 => Self::Imds,
            std::net::IpAddr::V6(ip) if ip == imds6 => Self::Imds,
            _ => Self::ContainerCredentials,
        }
    }

    /// Its name in logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Imds => "imds",
            Self::ContainerCredentials => "container-credentials",
        }
    }
}

/// The role a decision grants, or the refusal it comes to.
fn granted<'d>(decision: &'d RoleDecision, c: &Container) -> Result<&'d Role, Denial> {
    match decision {
        RoleDecision::Role(role) => Ok(role),
        RoleDecision::NoRole if Policy::native_steps(c) => Err(Denial::NoRoleNativeSteps),
        RoleDecision::NoRole => Err(Denial::NoRole),
        RoleDecision::Refused(reason) => Err(Denial::RoleRefused(reason.clone())),
    }
}

/// A successful answer.
pub struct Reply {
    response: Response<Full<Bytes>>,
    outcome: Outcome,
    /// For credentials: how long they had left when served.
    remaining: Option<Duration>,
}

/// The body may hold credentials: never printed.
impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("status", &self.response.status())
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

impl Reply {
    fn text(body: impl Into<Bytes>) -> Self {
        let mut response = Response::new(Full::new(body.into()));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain"),
        );
        Self {
            response,
            outcome: Outcome::Served,
            remaining: None,
        }
    }
}

/// What one request came to: the answer, and what `metaproxy connections`
/// records about it.
#[derive(Debug)]
pub struct Handled {
    pub endpoint: Endpoint,
    /// What was asked for (a bounded label: `credentials`, `token`,
    /// `passthrough`, ...).
    pub route: RouteLabel,
    pub container: Option<Arc<Container>>,
    /// The role the container may assume, if it has one.
    pub role: Option<RoleArn>,
    pub result: Result<Reply, Denial>,
}

impl Handled {
    fn new(
        endpoint: Endpoint,
        route: RouteLabel,
        container: Option<Arc<Container>>,
        role: Option<RoleArn>,
        result: Result<Reply, Denial>,
    ) -> Self {
        Self {
            endpoint,
            route,
            container,
            role,
            result,
        }
    }

    pub fn outcome(&self) -> Outcome {
        match &self.result {
            Ok(reply) => reply.outcome,
            Err(denial) => denial.outcome(),
        }
    }

    pub fn reason(&self) -> Option<String> {
        self.result.as_ref().err().and_then(Denial::reason)
    }

    /// The refusal's kind, for metrics.
    pub fn refusal(&self) -> Option<&'static str> {
        self.result.as_ref().err().map(Denial::kind)
    }

    /// How long the credentials served had left, if credentials were served.
    pub fn served_remaining(&self) -> Option<Duration> {
        self.result.as_ref().ok().and_then(|r| r.remaining)
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        match (self.result, self.endpoint) {
            (Ok(reply), _) => reply.response,
            (Err(denial), Endpoint::Imds) => denial.response(),
            (Err(denial), Endpoint::ContainerCredentials) => {
                denial.container_credentials_response()
            }
        }
    }
}

/// The IMDS surface and what it asks.
pub struct Surface {
    pub identities: Arc<Identities>,
    pub policy: Arc<Policy>,
    pub credentials: Arc<CredentialCache>,
    pub tokens: TokenKey,
    pub upstream: Arc<dyn Upstream>,
    pub options: SurfaceOptions,
}

impl std::fmt::Debug for Surface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Surface")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Surface {
    /// Answers one request from `caller`.
    pub async fn handle<B>(&self, req: Request<B>, caller: &Caller) -> Handled
    where
        B: Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let endpoint = Endpoint::of(caller.original_dst);
        match self.identities.identify(caller).await {
            Err(e) => {
                if let Some(suppressed) = REFUSAL_LOG.allow(caller.cgroup) {
                    tracing::warn!(cgroup_id = %caller.cgroup, error = %Clean(&e.to_string()), suppressed, "cannot identify caller");
                }
                Handled::new(
                    endpoint,
                    RouteLabel::Unidentified,
                    None,
                    None,
                    Err(e.into()),
                )
            }
            // Host processes have no role, and nothing behind the
            // container-credentials endpoint to pass through to.
            Ok(Identity::Host) if endpoint == Endpoint::ContainerCredentials => Handled::new(
                endpoint,
                RouteLabel::ContainerCredentials,
                None,
                None,
                Err(Denial::NotFound),
            ),
            Ok(Identity::Host) => Handled::new(
                endpoint,
                RouteLabel::Passthrough,
                None,
                None,
                self.host(req, caller).await,
            ),
            Ok(Identity::Container(c)) => {
                let token = self.identities.id_token(&c).await;
                let decision = self.policy.decision(&c, &token);
                let role = match &*decision {
                    RoleDecision::Role(role) => Some(role.arn.clone()),
                    _ => None,
                };
                if let RoleDecision::Refused(reason) = &*decision {
                    if let Some(suppressed) = REFUSAL_LOG.allow(&c.id) {
                        tracing::warn!(container_id = %c.id, container = %Clean(&c.name), reason = %Clean(&reason.to_string()), suppressed, "role refused");
                    }
                }
                if endpoint == Endpoint::ContainerCredentials {
                    let result = self
                        .container_credentials(&req, caller, &c, &decision)
                        .await;
                    return Handled::new(
                        endpoint,
                        RouteLabel::ContainerCredentials,
                        Some(c),
                        role,
                        result,
                    );
                }
                let route = Route::of(req.method(), req.uri().path(), req.uri().query());
                let result = self.container(&req, route, caller, &c, &decision).await;
                Handled::new(endpoint, route.label(), Some(c), role, result)
            }
        }
    }

    async fn host<B>(&self, req: Request<B>, caller: &Caller) -> Result<Reply, Denial>
    where
        B: Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.policy.host_access(caller)?;
        let (parts, body) = req.into_parts();
        let body = tokio::time::timeout(
            BODY_TIMEOUT,
            http_body_util::Limited::new(body, MAX_BODY).collect(),
        )
        .await
        .map_err(|_| Denial::HostBody)?
        .map_err(|_| Denial::HostBody)?
        .to_bytes();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let resp = self
            .upstream
            .forward(parts.method, path, &parts.headers, body)
            .await?;
        Ok(Reply {
            response: resp.map(Full::new),
            outcome: Outcome::Passthrough,
            remaining: None,
        })
    }

    async fn container<B>(
        &self,
        req: &Request<B>,
        route: Route<'_>,
        caller: &Caller,
        c: &Container,
        decision: &RoleDecision,
    ) -> Result<Reply, Denial> {
        not_forwarded(req)?;
        match route {
            Route::NotFound => return Err(Denial::NotFound),
            Route::MethodNotAllowed => return Err(Denial::MethodNotAllowed),
            Route::Token => return self.mint_token(req, c),
            _ => {}
        }
        match req.headers().get(TOKEN_HEADER) {
            Some(token) => {
                let token = token.to_str().unwrap_or("");
                self.tokens.verify(token, c.id.as_str(), unix_now())?;
            }
            None => {
                if let Some(why) = self.options.imdsv1.refusal() {
                    return Err(Denial::Imdsv1Refused(why));
                }
            }
        }
        if let Route::Metadata(path) = route {
            return Ok(Reply::text(self.upstream.get_cached(path).await?));
        }
        // Everything left is about the container's role.
        let role = granted(decision, c)?;
        match route {
            Route::RoleListing => Ok(Reply::text(role.arn.name().to_string())),
            Route::Credentials {
                role: asked,
                extended,
            } if asked == role.arn.name() => {
                self.serve_credentials(caller, c, role, extended).await
            }
            Route::IamInfo => Ok(Reply::text(document::iam_info(
                &role.arn,
                SystemTime::now(),
            ))),
            _ => Err(Denial::NotFound),
        }
    }

    fn mint_token<B>(&self, req: &Request<B>, c: &Container) -> Result<Reply, Denial> {
        let ttl = req
            .headers()
            .get(TTL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|t| (1..=routes::MAX_TTL).contains(t))
            .ok_or(Denial::TokenTtl)?;
        let mut reply = Reply::text(self.tokens.mint(c.id.as_str(), ttl, unix_now()));
        reply.response.headers_mut().insert(TTL_HEADER, ttl.into());
        Ok(reply)
    }

    async fn serve_credentials(
        &self,
        caller: &Caller,
        c: &Container,
        role: &Role,
        extended: bool,
    ) -> Result<Reply, Denial> {
        let creds = self.issue(caller, c, role, Endpoint::Imds).await?;
        let which = if extended {
            Rendering::ImdsExtended
        } else {
            Rendering::Imds
        };
        let body = creds.rendered(which, |creds| {
            let account = extended.then(|| role.arn.account().to_string());
            let doc = CredentialsDocument::new(creds, account);
            Bytes::from(serde_json::to_vec_pretty(&doc).unwrap_or_default())
        });
        let mut reply = Reply::text(body);
        reply.remaining = Some(creds.remaining());
        Ok(reply)
    }

    /// Credentials for `role`, for container `c`, with the audit line that
    /// records their issue to each cgroup of it that asks: a nested
    /// container (Docker-in-Docker's inner ones) gets a line of its own,
    /// naming its cgroup.
    async fn issue(
        &self,
        caller: &Caller,
        c: &Container,
        role: &Role,
        endpoint: Endpoint,
    ) -> Result<Arc<Issued>, Denial> {
        let key = CredKey::from(role);
        let creds = self
            .credentials
            .get(&key, &c.id, CREDENTIALS_WAIT)
            .await
            .inspect_err(|e| {
                if let Some(suppressed) = REFUSAL_LOG.allow(&c.id) {
                    tracing::warn!(container_id = %c.id, role_arn = %key.role_arn, reason = %Clean(&e.to_string()), suppressed, "no credentials to serve");
                }
            })?;
        if !creds.first_for(&c.id, caller.cgroup) {
            // Already recorded for this cgroup of this container;
            // `connections` and the metrics count the repeats.
            return Ok(creds);
        }
        // A cgroup below the container's own: a nested container's.
        let nested = caller
            .cgroup_path
            .as_deref()
            .filter(|p| Some(*p) != c.cgroup.as_deref());
        tracing::info!(
            target: "metaproxy::audit",
            container_id = %c.id,
            container = %Clean(&c.name),
            job = %Clean(c.job_id().unwrap_or("-")),
            role_arn = %key.role_arn,
            session = %key.session_name,
            source = role.source(),
            access_key_id = %creds.access_key_id,
            expiration = %imds_time(creds.expiration),
            endpoint = endpoint.name(),
            // Quoted and last: a job names its inner cgroups, spaces and
            // `=` included, and must not add fields to the line.
            nested = ?nested.unwrap_or("-"),
            "credentials issued"
        );
        Ok(creds)
    }
}

/// A granted role is assumed as this key: credentials know keys, not
/// decisions.
impl From<&Role> for CredKey {
    fn from(role: &Role) -> Self {
        Self {
            role_arn: role.arn.clone(),
            external_id: role.external_id.clone(),
            session_name: role.session_name.clone(),
            session: role.session.clone(),
            id_token: role.id_token.as_ref().map(|t| IdTokenKey {
                token: t.raw.clone(),
                expires: t.expires(),
            }),
        }
    }
}

/// Containers' requests carry no `X-Forwarded-For`: one that does came
/// through a proxy in the container (SSRF), as IMDS itself refuses.
fn not_forwarded<B>(req: &Request<B>) -> Result<(), Denial> {
    if req.headers().contains_key("x-forwarded-for") {
        return Err(Denial::ForwardedFor);
    }
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_never_prints_its_body() {
        let reply = Reply::text(r#"{"SecretAccessKey": "very-secret"}"#);
        let printed = format!("{reply:?}");
        assert!(printed.contains("200"), "{printed}");
        assert!(!printed.contains("very-secret"), "{printed}");
    }
}
