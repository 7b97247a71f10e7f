//! Every way a request can be turned down, in one enum that alone decides
//! its HTTP status, its outcome in the connection log and the reason an
//! admin reads. No status code is chosen anywhere else.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Response, StatusCode};

use crate::{
    attribution::AttributionError,
    credentials::CredentialsError,
    identity::IdentityError,
    ops::connlog::Outcome,
    policy::{HostRefusal, RoleRefusal},
    surface::upstream::UpstreamError,
};

use super::{
    container_credentials::{AuthFailure, NotEnabled},
    token::TokenError,
};

#[derive(Debug, Clone, thiserror::Error)]
pub enum Denial {
    /// The probe has no record of the connection.
    #[error(transparent)]
    Attribution(#[from] AttributionError),
    /// The caller's cgroup could not be tied to a container we know.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A host process without pass-through.
    #[error(transparent)]
    Host(#[from] HostRefusal),
    #[error("bad request body")]
    HostBody,
    /// The real IMDS failed us.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// IMDS refuses requests that went through a proxy.
    #[error("X-Forwarded-For present")]
    ForwardedFor,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("token TTL missing or out of range")]
    TokenTtl,
    #[error("token: {0}")]
    Token(#[from] TokenError),
    #[error("IMDSv1 refused ({0})")]
    Imdsv1Refused(&'static str),
    /// The container has no role: nothing to serve.
    #[error("no role")]
    NoRole,
    /// No role, in a build container of gitlab-runner's native steps mode.
    #[error("no role: this build container has no CI_ variables, as in gitlab-runner's native steps mode, which keeps the runner's environment (IAM_ROLE) out of the container")]
    NoRoleNativeSteps,
    #[error(transparent)]
    RoleRefused(#[from] RoleRefusal),
    /// STS did not give us credentials to serve.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// The container-credentials endpoint requires the container's own
    /// authorization token here, and the request lacks it.
    #[error(transparent)]
    ContainerAuthorization(#[from] AuthFailure),
    /// The runner did not turn the container-credentials endpoint on for
    /// this container.
    #[error(transparent)]
    NotEnabled(#[from] NotEnabled),
}

impl Denial {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Attribution(_) | Self::Identity(_) | Self::Host(_) | Self::ForwardedFor => {
                StatusCode::FORBIDDEN
            }
            Self::HostBody | Self::TokenTtl => StatusCode::BAD_REQUEST,
            Self::Upstream(_) => StatusCode::BAD_GATEWAY,
            Self::NotFound
            | Self::NoRole
            | Self::NoRoleNativeSteps
            | Self::RoleRefused(_)
            | Self::NotEnabled(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Token(_) | Self::Imdsv1Refused(_) | Self::ContainerAuthorization(_) => {
                StatusCode::UNAUTHORIZED
            }
            Self::Credentials(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn outcome(&self) -> Outcome {
        match self {
            Self::NotFound | Self::MethodNotAllowed => Outcome::NotFound,
            Self::NoRole | Self::NoRoleNativeSteps => Outcome::NoRole,
            Self::Token(_) | Self::Imdsv1Refused(_) | Self::ContainerAuthorization(_) => {
                Outcome::Unauthorized
            }
            _ => Outcome::Refused,
        }
    }

    /// The kind of refusal, a bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        use crate::{attribution::AttributionError as A, identity::IdentityError as I};
        match self {
            Self::Attribution(A::NoRecord) => "no-record",
            Self::Attribution(A::Lookup(_)) => "probe-lookup",
            Self::Attribution(A::NotItsSlot) => "not-its-slot",
            Self::Identity(I::CgroupGone(_)) => "cgroup-gone",
            Self::Identity(I::UnknownContainer { .. }) => "unknown-container",
            Self::Identity(I::UnknownRuntime { .. }) => "unknown-runtime",
            Self::Identity(I::NotItsCgroup { .. }) => "not-its-cgroup",
            Self::Identity(I::ForeignAddress(_)) => "foreign-address",
            Self::Identity(I::Runtime(_)) => "docker-unavailable",
            Self::Host(HostRefusal::ContainerRuntime(_)) => "host-runtime",
            Self::Host(HostRefusal::BuildStep(_)) => "host-build-step",
            Self::Host(HostRefusal::NotAllowListed(_)) => "host-not-allowed",
            Self::Host(HostRefusal::UnknownCgroup) => "host-unknown-cgroup",
            Self::HostBody => "bad-body",
            Self::Upstream(_) => "imds-unavailable",
            Self::ForwardedFor => "forwarded",
            Self::NotFound => "not-found",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::TokenTtl => "token-ttl",
            Self::Token(_) => "bad-token",
            Self::Imdsv1Refused(_) => "imdsv1-refused",
            Self::NoRole | Self::NoRoleNativeSteps => "no-role",
            Self::RoleRefused(_) => "role-refused",
            Self::Credentials(_) => "sts-unavailable",
            Self::ContainerAuthorization(_) => "bad-authorization",
            Self::NotEnabled(_) => "not-enabled",
        }
    }

    /// What `metaproxy connections` shows as the reason; `None` where the
    /// outcome says it all.
    pub fn reason(&self) -> Option<String> {
        match self {
            Self::NotFound | Self::MethodNotAllowed | Self::NoRole => None,
            other => Some(other.to_string()),
        }
    }

    /// The answer on the container-credentials endpoint, shaped as the ECS
    /// agent's errors: `{"code": ..., "message": ...}`. The message is
    /// fixed per code; the reason stays in our log.
    pub fn container_credentials_response(&self) -> Response<Full<Bytes>> {
        let (code, message) = match self {
            Self::NoRole | Self::NoRoleNativeSteps => ("NoRole", "this container has no IAM role"),
            Self::RoleRefused(_) => (
                "RoleRefused",
                "this container's IAM role is refused; the host's `metaproxy connections` says why",
            ),
            Self::Credentials(_) => (
                "CredentialsUnavailable",
                "credentials are not available yet; retry",
            ),
            Self::NotFound => ("NotFound", "no such path"),
            Self::MethodNotAllowed => ("MethodNotAllowed", "use GET"),
            Self::ContainerAuthorization(_) => (
                "Unauthorized",
                "Authorization must be the container's AWS_CONTAINER_AUTHORIZATION_TOKEN",
            ),
            Self::NotEnabled(_) => (
                "NotEnabled",
                "the container-credentials endpoint is not turned on for this container; the host's `metaproxy connections` says why",
            ),
            _ => ("AccessDenied", "this caller gets no credentials here"),
        };
        let body = serde_json::json!({ "code": code, "message": message });
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
        *resp.status_mut() = self.status();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        resp
    }

    /// The answer the caller gets: a status line and its canonical reason,
    /// as IMDS writes errors. The reason stays in our log; the caller learns
    /// no more than IMDS would tell it.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let status = self.status();
        let mut resp = Response::new(Full::new(Bytes::from(format!(
            "{}\n",
            status.canonical_reason().unwrap_or("")
        ))));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain"),
        );
        if matches!(self, Self::Attribution(_)) {
            // Nothing on this connection will be served.
            resp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_denial_has_one_status_outcome_and_reason() {
        let cases: Vec<(Denial, u16, Outcome, Option<&str>)> = vec![
            (
                AttributionError::NoRecord.into(),
                403,
                Outcome::Refused,
                Some("no probe record for this connection"),
            ),
            (
                HostRefusal::NotAllowListed("/x".into()).into(),
                403,
                Outcome::Refused,
                Some("cgroup /x is not in --allow-host-cgroup"),
            ),
            (
                Denial::ForwardedFor,
                403,
                Outcome::Refused,
                Some("X-Forwarded-For present"),
            ),
            (Denial::NotFound, 404, Outcome::NotFound, None),
            (Denial::MethodNotAllowed, 405, Outcome::NotFound, None),
            (
                Denial::TokenTtl,
                400,
                Outcome::Refused,
                Some("token TTL missing or out of range"),
            ),
            (
                TokenError::Expired.into(),
                401,
                Outcome::Unauthorized,
                Some("token: expired"),
            ),
            (
                Denial::Imdsv1Refused("the instance requires IMDSv2"),
                401,
                Outcome::Unauthorized,
                Some("IMDSv1 refused (the instance requires IMDSv2)"),
            ),
            (Denial::NoRole, 404, Outcome::NoRole, None),
            (
                NotEnabled::NotAsked.into(),
                404,
                Outcome::Refused,
                Some("the runner did not turn the container-credentials endpoint on for this container (no AWS_CONTAINER_CREDENTIALS_RELATIVE_URI or AWS_CONTAINER_CREDENTIALS_FULL_URI of its own)"),
            ),
            (
                AuthFailure::NoToken("the instance requires IMDSv2").into(),
                401,
                Outcome::Unauthorized,
                Some("the runner set no AWS_CONTAINER_AUTHORIZATION_TOKEN for this container, which the endpoint requires here (the instance requires IMDSv2)"),
            ),
            (
                RoleRefusal::AccountUnknown.into(),
                404,
                Outcome::Refused,
                Some("the instance profile's account is not known yet"),
            ),
            (
                CredentialsError::Timeout(std::time::Duration::from_millis(800)).into(),
                503,
                Outcome::Refused,
                Some("STS has not answered within 800ms; still trying"),
            ),
            (
                UpstreamError::Status(StatusCode::NOT_FOUND).into(),
                502,
                Outcome::Refused,
                Some("IMDS answered 404 Not Found"),
            ),
        ];
        for (denial, status, outcome, reason) in cases {
            assert_eq!(denial.status().as_u16(), status, "{denial:?}");
            assert_eq!(denial.outcome(), outcome, "{denial:?}");
            assert_eq!(denial.reason().as_deref(), reason, "{denial:?}");
            assert_eq!(denial.response().status().as_u16(), status);
        }
        let refused = Denial::from(AttributionError::NoRecord).response();
        assert_eq!(refused.headers()[header::CONNECTION], "close");
    }
}
