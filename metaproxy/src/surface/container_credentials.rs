//! The container-credentials endpoint (what SDKs read through
//! `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` or `_FULL_URI`): one path, no
//! session token (the caller is known by its cgroup, as for IMDS), one
//! request for credentials.
//!
//! It answers only containers whose runner asked for it: the runner's
//! `environment` sets one of those two variables, under the same rules as
//! `IAM_ROLE` (not only the image's `ENV`, never two different values).
//! SDKs try this endpoint before IMDS, and it takes no token, so serving
//! every container with a role would give each of them a route around
//! IMDSv2 that nobody chose. For the same reason, where containers must use
//! IMDSv2 (the instance requires it, or `--imdsv1 refuse`) the endpoint
//! requires the runner-set `AWS_CONTAINER_AUTHORIZATION_TOKEN` as the
//! `Authorization` header, which a request forged through a job's service
//! (SSRF) does not carry; `--container-credentials-require-auth` requires
//! it everywhere.

use bytes::Bytes;
use hyper::{header, Request};

use super::{document, granted, Denial, Reply, Surface};
use crate::{
    model::{
        caller::Caller,
        container::Container,
        gitlab::{single_value, Unclear},
    },
    policy::RoleDecision,
    surface::render::{Rendering, Served as _},
};

/// The variables by which the runner turns the endpoint on for a container.
pub const OPT_IN: [&str; 2] = [
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
];
/// The runner-set token that `Authorization` must carry where required.
pub const TOKEN_VAR: &str = "AWS_CONTAINER_AUTHORIZATION_TOKEN";

/// The endpoint's settings.
#[derive(Debug, Clone)]
pub struct ContainerCredentialsOptions {
    /// The one path served, `/v1/credentials` by default.
    pub path: String,
    /// Require `Authorization` to be the container's own
    /// `AWS_CONTAINER_AUTHORIZATION_TOKEN` (as the runner set it) even
    /// where containers may use IMDSv1.
    pub require_auth: bool,
}

impl Default for ContainerCredentialsOptions {
    fn default() -> Self {
        Self {
            path: "/v1/credentials".into(),
            require_auth: false,
        }
    }
}

/// Why the endpoint is off for a container.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotEnabled {
    #[error("the runner did not turn the container-credentials endpoint on for this container (no AWS_CONTAINER_CREDENTIALS_RELATIVE_URI or AWS_CONTAINER_CREDENTIALS_FULL_URI of its own)")]
    NotAsked,
    /// One of the variables is set twice differently, or only by the image.
    #[error("the container-credentials endpoint is off for this container: {0}")]
    Refused(Unclear),
}

/// Why a request lacks the authorization the endpoint requires here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("the runner set no AWS_CONTAINER_AUTHORIZATION_TOKEN for this container, which the endpoint requires here ({0})")]
    NoToken(&'static str),
    #[error("AWS_CONTAINER_AUTHORIZATION_TOKEN is not usable ({reason}), and the endpoint requires it here ({required_by})")]
    TokenRefused {
        reason: Unclear,
        required_by: &'static str,
    },
    #[error("Authorization header missing, or not the container's AWS_CONTAINER_AUTHORIZATION_TOKEN ({0})")]
    Mismatch(&'static str),
}

/// Whether the runner turned the endpoint on for `c`.
pub fn opted_in(c: &Container) -> Result<(), NotEnabled> {
    let mut asked = false;
    let mut refused = None;
    for key in OPT_IN {
        match single_value(&c.env, &c.image_env, key) {
            Ok(Some(_)) => asked = true,
            Ok(None) => {}
            // Two values: which one is the runner's is a guess.
            Err(conflict @ Unclear::Conflicting(_)) => return Err(NotEnabled::Refused(conflict)),
            Err(other) => {
                refused.get_or_insert(other);
            }
        }
    }
    match (asked, refused) {
        (true, _) => Ok(()),
        (false, Some(why)) => Err(NotEnabled::Refused(why)),
        (false, None) => Err(NotEnabled::NotAsked),
    }
}

/// Whether `presented` (the request's `Authorization`) is the runner-set
/// token of `c`, where `required_by` says the endpoint requires one.
pub fn authorize(
    presented: Option<&[u8]>,
    c: &Container,
    required_by: &'static str,
) -> Result<(), AuthFailure> {
    let expected = match single_value(&c.env, &c.image_env, TOKEN_VAR) {
        Ok(Some(token)) => token,
        Ok(None) => return Err(AuthFailure::NoToken(required_by)),
        Err(reason) => {
            return Err(AuthFailure::TokenRefused {
                reason,
                required_by,
            })
        }
    };
    let matches = presented
        .is_some_and(|p| bool::from(subtle::ConstantTimeEq::ct_eq(p, expected.as_bytes())));
    if matches {
        Ok(())
    } else {
        Err(AuthFailure::Mismatch(required_by))
    }
}

impl Surface {
    /// Why this endpoint requires the container's token, if it does.
    fn auth_required_by(&self) -> Option<&'static str> {
        if self.options.container_credentials.require_auth {
            return Some("--container-credentials-require-auth");
        }
        self.options.imdsv1.refusal()
    }

    /// Answers one request on the endpoint from container `c`.
    pub(super) async fn container_credentials<B>(
        &self,
        req: &Request<B>,
        caller: &Caller,
        c: &Container,
        decision: &RoleDecision,
    ) -> Result<Reply, Denial> {
        let options = &self.options.container_credentials;
        super::not_forwarded(req)?;
        opted_in(c)?;
        if req.uri().path() != options.path || req.uri().query().is_some() {
            return Err(Denial::NotFound);
        }
        if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
            return Err(Denial::MethodNotAllowed);
        }
        if let Some(required_by) = self.auth_required_by() {
            let presented = req
                .headers()
                .get(header::AUTHORIZATION)
                .map(hyper::header::HeaderValue::as_bytes);
            authorize(presented, c, required_by)?;
        }
        let role = granted(decision, c)?;
        let creds = self
            .issue(caller, c, role, super::Endpoint::ContainerCredentials)
            .await?;
        let body = creds.rendered(Rendering::ContainerCredentials, |creds| {
            let doc = document::ContainerCredentialsDocument::new(creds, &role.arn);
            Bytes::from(serde_json::to_vec(&doc).unwrap_or_default())
        });
        let mut reply = Reply::text(body);
        reply.response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        reply.remaining = Some(creds.remaining());
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::model::ids::ContainerId;

    fn container(env: &[&str], image_env: &[&str]) -> Container {
        Container {
            id: ContainerId::parse(&"c".repeat(64)).unwrap(),
            name: "job".into(),
            labels: HashMap::new(),
            env: env.iter().map(|s| s.to_string()).collect(),
            image_env: image_env.iter().map(|s| s.to_string()).collect(),
            image_labels: HashMap::new(),
            addresses: None,
            cgroup: None,
            wire: Default::default(),
        }
    }

    #[test]
    fn only_the_runners_own_opt_in_turns_the_endpoint_on() {
        let rel = "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v1/credentials";
        let full = "AWS_CONTAINER_CREDENTIALS_FULL_URI=http://169.254.170.23/v1/credentials";
        assert_eq!(opted_in(&container(&[rel], &[])), Ok(()));
        assert_eq!(opted_in(&container(&[full], &[])), Ok(()));
        assert_eq!(
            opted_in(&container(&["IAM_ROLE=x"], &[])),
            Err(NotEnabled::NotAsked)
        );
        // Only the image's ENV: the image author does not decide.
        assert_eq!(
            opted_in(&container(&[rel], &[rel])),
            Err(NotEnabled::Refused(Unclear::FromImage(OPT_IN[0])))
        );
        // Two different values: refused, whichever the other variable says.
        let other = "AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:1/x";
        assert_eq!(
            opted_in(&container(&[rel, full, other], &[])),
            Err(NotEnabled::Refused(Unclear::Conflicting(OPT_IN[1])))
        );
        // The runner clearing the image's value turns it off.
        let cleared = "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=";
        assert_eq!(
            opted_in(&container(&[cleared], &[rel])),
            Err(NotEnabled::NotAsked)
        );
        // A job's own variable after the runner's empty one (gitlab-runner
        // puts the runner's environment first): two values, refused.
        assert_eq!(
            opted_in(&container(&[cleared, rel], &[])),
            Err(NotEnabled::Refused(Unclear::Conflicting(OPT_IN[0])))
        );
        // Where the runner cleared nothing, a job's own variable is the only
        // value: doctor warns of that runner.
        assert_eq!(opted_in(&container(&[rel], &[])), Ok(()));
    }

    #[test]
    fn a_required_token_is_the_runners_and_the_reason_says_which_is_missing() {
        let by = "the instance requires IMDSv2";
        let job = container(&["AWS_CONTAINER_AUTHORIZATION_TOKEN=s3cret"], &[]);
        assert_eq!(authorize(Some(b"s3cret"), &job, by), Ok(()));
        assert_eq!(
            authorize(Some(b"s3cre"), &job, by),
            Err(AuthFailure::Mismatch(by))
        );
        assert_eq!(authorize(None, &job, by), Err(AuthFailure::Mismatch(by)));
        let none = container(&[], &[]);
        assert_eq!(
            authorize(Some(b""), &none, by),
            Err(AuthFailure::NoToken(by))
        );
        let image = container(
            &["AWS_CONTAINER_AUTHORIZATION_TOKEN=s3cret"],
            &["AWS_CONTAINER_AUTHORIZATION_TOKEN=s3cret"],
        );
        let refused = authorize(Some(b"s3cret"), &image, by).unwrap_err();
        assert!(matches!(refused, AuthFailure::TokenRefused { .. }));
        // The reason never quotes the token.
        assert!(!refused.to_string().contains("s3cret"), "{refused}");
    }
}
