//! The IMDS surface that intercepted callers see.
//!
//! * A container gets exactly what IMDS would give an instance whose profile
//!   is the container's role: IMDSv2 tokens (bound to the container), the
//!   role listing and its credentials, a short allow-list of non-secret
//!   metadata. Everything else (user-data, identity credentials, unknown or
//!   odd paths) is 404 and never forwarded.
//! * A host process (in no container) is passed through to the real IMDS
//!   unchanged, unless `--host-processes deny`.
//!
//! Status codes are decided here and nowhere else.

mod token;
mod upstream;

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use serde::Serialize;

pub use token::TokenKey;
pub use upstream::Upstream;

use crate::{
    connlog::Outcome,
    credentials::{CredKey, CredentialCache, Credentials},
    identity::{Container, Identities, Identity},
    policy::RoleDecision,
    server::Caller,
};

const TOKEN_PATH: &str = "/latest/api/token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const MAX_TTL: u64 = 21_600;
const CREDS_PREFIX: &str = "/latest/meta-data/iam/security-credentials";
const CREDS_EXT_PREFIX: &str = "/latest/meta-data/iam/security-credentials-extended";
/// How long a request waits for credentials that are not cached: under the
/// SDKs' IMDS timeouts (aws-config and botocore give 1 s).
const CREDENTIALS_WAIT: std::time::Duration = std::time::Duration::from_millis(800);

/// Non-secret metadata that SDKs and tools read, fetched for containers from
/// the real IMDS. Deliberately short: no user-data, no identity signatures
/// (they would let a job pose as the instance), no network details.
const PASSTHROUGH: &[&str] = &[
    "/latest/meta-data/placement/region",
    "/latest/meta-data/placement/availability-zone",
    "/latest/meta-data/placement/availability-zone-id",
    "/latest/meta-data/instance-id",
    "/latest/meta-data/instance-type",
    "/latest/meta-data/ami-id",
    "/latest/meta-data/services/domain",
    "/latest/meta-data/services/partition",
    "/latest/dynamic/instance-identity/document",
];

/// What to do with requests from processes in no container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HostProcesses {
    /// Pass them through to the real IMDS unchanged.
    Allow,
    /// Refuse them (403).
    Deny,
}

#[derive(Debug, Clone, Copy)]
pub struct ImdsOptions {
    pub require_imdsv2: bool,
    pub host_processes: HostProcesses,
}

/// What one request came to, for `metaproxy connections`.
#[derive(Debug, Clone)]
pub struct Handled {
    pub container: Option<Arc<Container>>,
    pub outcome: Outcome,
    pub reason: Option<String>,
}

impl Handled {
    fn new(container: Option<&Arc<Container>>, outcome: Outcome, reason: Option<String>) -> Self {
        Self {
            container: container.cloned(),
            outcome,
            reason,
        }
    }
}

#[derive(Debug)]
pub struct Imds {
    pub identities: Arc<Identities>,
    pub credentials: Arc<CredentialCache>,
    pub tokens: TokenKey,
    pub upstream: Upstream,
    pub options: ImdsOptions,
}

type Resp = Response<Full<Bytes>>;

impl Imds {
    pub async fn handle(&self, req: Request<Incoming>, caller: &Caller) -> (Resp, Handled) {
        let identity = match self.identify(caller).await {
            Ok(identity) => identity,
            Err(e) => {
                tracing::warn!(cgroup_id = caller.record.cgroup_id, error = %e, "cannot identify caller");
                return (
                    status(StatusCode::FORBIDDEN),
                    Handled::new(None, Outcome::Refused, Some(e.to_string())),
                );
            }
        };
        match identity {
            Identity::Host => self.host(req, caller).await,
            Identity::Container(c) => {
                let (resp, outcome, reason) = self.container(&req, &c).await;
                (resp, Handled::new(Some(&c), outcome, reason))
            }
        }
    }

    /// Resolves the caller, and checks that a container's connection comes
    /// from one of its own addresses (asking Docker again once, in case its
    /// networks changed since we cached it).
    async fn identify(&self, caller: &Caller) -> Result<Identity, String> {
        let (id, path) = (caller.record.cgroup_id, caller.cgroup.as_deref());
        for fresh in [false, true] {
            if fresh {
                self.identities.invalidate(id);
            }
            match self
                .identities
                .resolve(id, path)
                .await
                .map_err(|e| e.to_string())?
            {
                Identity::Container(c) if !c.owns_address(caller.peer.ip()) => continue,
                identity => return Ok(identity),
            }
        }
        Err(format!(
            "client address {} is not the container's",
            caller.peer.ip()
        ))
    }

    async fn host(&self, req: Request<Incoming>, caller: &Caller) -> (Resp, Handled) {
        let refuse = |reason: String| {
            (
                status(StatusCode::FORBIDDEN),
                Handled::new(None, Outcome::Refused, Some(reason)),
            )
        };
        if self.options.host_processes == HostProcesses::Deny {
            return refuse("host process (--host-processes deny)".into());
        }
        let comm = crate::server::comm(&caller.record.comm);
        if is_container_runtime(&comm) {
            // dockerd fetches URLs for its API clients (`docker build` with
            // `ADD http://169.254.169.254/...`), and jobs are API clients.
            return refuse(format!(
                "{comm} acts for containers; it gets no pass-through"
            ));
        }
        let (parts, body) = req.into_parts();
        let body = match http_body_util::Limited::new(body, upstream::MAX_BODY)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return (
                    status(StatusCode::BAD_REQUEST),
                    Handled::new(None, Outcome::Refused, Some("bad request body".into())),
                )
            }
        };
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        match self
            .upstream
            .forward(parts.method, path, &parts.headers, body)
            .await
        {
            Ok(resp) => (
                resp.map(Full::new),
                Handled::new(None, Outcome::Passthrough, None),
            ),
            Err(e) => (
                status(StatusCode::BAD_GATEWAY),
                Handled::new(None, Outcome::Refused, Some(e.to_string())),
            ),
        }
    }

    async fn container(
        &self,
        req: &Request<Incoming>,
        c: &Arc<Container>,
    ) -> (Resp, Outcome, Option<String>) {
        if req.headers().contains_key("x-forwarded-for") {
            // IMDS refuses requests that went through a proxy.
            return (
                status(StatusCode::FORBIDDEN),
                Outcome::Refused,
                Some("X-Forwarded-For present".into()),
            );
        }
        let route = Route::of(req.method(), req.uri().path(), req.uri().query());
        match route {
            Route::NotFound => return not_found(),
            Route::MethodNotAllowed => {
                return (
                    status(StatusCode::METHOD_NOT_ALLOWED),
                    Outcome::NotFound,
                    None,
                )
            }
            Route::Token => return self.mint_token(req, c),
            _ => {}
        }
        match req.headers().get(TOKEN_HEADER) {
            Some(token) => {
                let token = token.to_str().unwrap_or("");
                if let Err(e) = self.tokens.verify(token, &c.id, unix_now()) {
                    return (
                        status(StatusCode::UNAUTHORIZED),
                        Outcome::Unauthorized,
                        Some(format!("token: {e:?}")),
                    );
                }
            }
            None if self.options.require_imdsv2 => {
                return (
                    status(StatusCode::UNAUTHORIZED),
                    Outcome::Unauthorized,
                    Some("IMDSv1 refused (--require-imdsv2)".into()),
                );
            }
            None => {}
        }
        if let Route::Metadata(path) = route {
            return match self.upstream.get_cached(path).await {
                Ok(body) => (Response::new(Full::new(body)), Outcome::Served, None),
                Err(e) => (
                    status(StatusCode::BAD_GATEWAY),
                    Outcome::Refused,
                    Some(e.to_string()),
                ),
            };
        }
        // Everything left is about the container's role.
        let role = match &c.role {
            RoleDecision::Role(role) => role,
            RoleDecision::NoRole => return (status(StatusCode::NOT_FOUND), Outcome::NoRole, None),
            RoleDecision::Refused(reason) => {
                return (
                    status(StatusCode::NOT_FOUND),
                    Outcome::Refused,
                    Some(reason.clone()),
                )
            }
        };
        match route {
            Route::RoleListing => (text(role.name().to_string()), Outcome::Served, None),
            Route::Credentials {
                role: asked,
                extended,
            } if asked == role.name() => self.serve_credentials(c, extended).await,
            Route::IamInfo => {
                let body = serde_json::json!({
                    "Code": "Success",
                    "LastUpdated": imds_time(SystemTime::now()),
                    "InstanceProfileArn": format!("arn:aws:iam::{}:instance-profile/{}", role.account(), role.name()),
                    "InstanceProfileId": "AIPAMETAPROXY",
                });
                (
                    text(serde_json::to_string_pretty(&body).unwrap_or_default()),
                    Outcome::Served,
                    None,
                )
            }
            _ => not_found(),
        }
    }

    fn mint_token(
        &self,
        req: &Request<Incoming>,
        c: &Container,
    ) -> (Resp, Outcome, Option<String>) {
        let ttl = req
            .headers()
            .get(TTL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|t| (1..=MAX_TTL).contains(t));
        let Some(ttl) = ttl else {
            return (
                status(StatusCode::BAD_REQUEST),
                Outcome::Refused,
                Some("token TTL missing or out of range".into()),
            );
        };
        let mut resp = text(self.tokens.mint(&c.id, ttl, unix_now()));
        resp.headers_mut().insert(TTL_HEADER, ttl.into());
        (resp, Outcome::Served, None)
    }

    /// Fetches credentials that are not cached, waiting no longer than SDKs
    /// wait for IMDS. The fetch runs on as its own task, so a slow STS fills
    /// the cache for the SDK's retry instead of being abandoned.
    async fn fetch(&self, key: &CredKey) -> Result<Credentials, String> {
        let (cache, key) = (self.credentials.clone(), key.clone());
        let task = tokio::spawn(async move { cache.get(&key).await });
        match tokio::time::timeout(CREDENTIALS_WAIT, task).await {
            Ok(Ok(result)) => result.map_err(|e| e.to_string()),
            Ok(Err(e)) => Err(format!("credential fetch failed: {e}")),
            Err(_) => Err(format!(
                "STS has not answered within {CREDENTIALS_WAIT:?}; still trying"
            )),
        }
    }

    async fn serve_credentials(
        &self,
        c: &Container,
        extended: bool,
    ) -> (Resp, Outcome, Option<String>) {
        let Some(key) = c.cred_key() else {
            return not_found();
        };
        let creds = match self.credentials.cached(&key) {
            Some(creds) => creds,
            None => match self.fetch(&key).await {
                Ok(creds) => creds,
                Err(reason) => {
                    tracing::warn!(container_id = %c.id, role_arn = %key.role_arn, %reason, "no credentials to serve");
                    return (
                        status(StatusCode::SERVICE_UNAVAILABLE),
                        Outcome::Refused,
                        Some(reason),
                    );
                }
            },
        };
        tracing::info!(
            target: "metaproxy::audit",
            container_id = %c.id,
            container = %c.name,
            job = %c.job_id.as_deref().unwrap_or("-"),
            role_arn = %key.role_arn,
            session = %key.session_name,
            access_key_id = %creds.access_key_id,
            expiration = %imds_time(creds.expiration),
            "credentials issued"
        );
        let account = extended.then(|| match &c.role {
            RoleDecision::Role(role) => role.account().to_string(),
            _ => String::new(),
        });
        let body = CredentialsDocument::new(&creds, account);
        (
            text(serde_json::to_string_pretty(&body).unwrap_or_default()),
            Outcome::Served,
            None,
        )
    }
}

/// The credentials document, field for field as IMDS writes it.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialsDocument<'a> {
    code: &'static str,
    last_updated: String,
    #[serde(rename = "Type")]
    kind: &'static str,
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    expiration: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    account_id: Option<String>,
}

impl<'a> CredentialsDocument<'a> {
    fn new(c: &'a Credentials, account_id: Option<String>) -> Self {
        Self {
            code: "Success",
            last_updated: imds_time(c.last_updated),
            kind: "AWS-HMAC",
            access_key_id: &c.access_key_id,
            secret_access_key: c.secret_access_key.expose(),
            token: c.session_token.expose(),
            expiration: imds_time(c.expiration),
            account_id,
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ`, as IMDS writes times (no fractions).
pub fn imds_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Host processes that act on behalf of containers or Docker API clients.
fn is_container_runtime(comm: &str) -> bool {
    matches!(
        comm,
        "dockerd" | "containerd" | "buildkitd" | "docker-proxy" | "runc" | "docker-init"
    ) || comm.starts_with("containerd-shim")
}

/// What a container's request asks for, decided from method and path alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route<'a> {
    /// `PUT /latest/api/token`
    Token,
    /// `.../iam/security-credentials/`
    RoleListing,
    /// `.../iam/security-credentials[-extended]/<role>`
    Credentials {
        role: &'a str,
        extended: bool,
    },
    /// `.../iam/info`
    IamInfo,
    /// An allow-listed, non-secret path fetched from the real IMDS.
    Metadata(&'static str),
    MethodNotAllowed,
    NotFound,
}

impl<'a> Route<'a> {
    fn of(method: &Method, path: &'a str, query: Option<&str>) -> Self {
        if query.is_some() || !is_plain_path(path) {
            return Self::NotFound;
        }
        if path == TOKEN_PATH {
            return if method == Method::PUT {
                Self::Token
            } else {
                Self::MethodNotAllowed
            };
        }
        if method != Method::GET && method != Method::HEAD {
            return Self::MethodNotAllowed;
        }
        let creds = path
            .strip_prefix(CREDS_EXT_PREFIX)
            .map(|rest| (rest, true))
            .or_else(|| path.strip_prefix(CREDS_PREFIX).map(|rest| (rest, false)));
        if let Some((rest, extended)) = creds {
            return match rest.strip_prefix('/') {
                None if rest.is_empty() => Self::RoleListing,
                Some("") => Self::RoleListing,
                Some(role) if !role.contains('/') => Self::Credentials { role, extended },
                _ => Self::NotFound,
            };
        }
        if path == "/latest/meta-data/iam/info" {
            return Self::IamInfo;
        }
        PASSTHROUGH
            .iter()
            .find(|p| **p == path)
            .map_or(Self::NotFound, |p| Self::Metadata(p))
    }
}

/// Only plain absolute paths: no `..`, `.`, empty segments, percent-escapes
/// or characters IMDS paths never contain.
fn is_plain_path(path: &str) -> bool {
    path.starts_with('/')
        && !path.contains("//")
        && path.split('/').all(|seg| seg != "." && seg != "..")
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_.+=,@".contains(&b))
}

fn not_found() -> (Resp, Outcome, Option<String>) {
    (status(StatusCode::NOT_FOUND), Outcome::NotFound, None)
}

fn text(body: String) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    resp
}

pub fn status(code: StatusCode) -> Resp {
    let mut resp = text(format!("{}\n", code.canonical_reason().unwrap_or("")));
    *resp.status_mut() = code;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_router_maps_only_what_imds_serves() {
        let get = |p| Route::of(&Method::GET, p, None);
        assert_eq!(Route::of(&Method::PUT, TOKEN_PATH, None), Route::Token);
        assert_eq!(get(TOKEN_PATH), Route::MethodNotAllowed);
        assert_eq!(
            Route::of(&Method::POST, CREDS_PREFIX, None),
            Route::MethodNotAllowed
        );
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials/"),
            Route::RoleListing
        );
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials"),
            Route::RoleListing
        );
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials/ci-deploy"),
            Route::Credentials {
                role: "ci-deploy",
                extended: false
            }
        );
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials-extended/ci-deploy"),
            Route::Credentials {
                role: "ci-deploy",
                extended: true
            }
        );
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials/a/b"),
            Route::NotFound
        );
        assert_eq!(
            get("/latest/meta-data/iam/security-credentialsX"),
            Route::NotFound
        );
        assert_eq!(get("/latest/meta-data/iam/info"), Route::IamInfo);
        assert_eq!(
            get("/latest/meta-data/placement/region"),
            Route::Metadata("/latest/meta-data/placement/region")
        );
        assert_eq!(
            Route::of(
                &Method::GET,
                "/latest/meta-data/placement/region",
                Some("x=1")
            ),
            Route::NotFound
        );
        for secret in [
            "/latest/user-data",
            "/latest/user-data/",
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "/latest/dynamic/instance-identity/signature",
            "/latest/dynamic/instance-identity/pkcs7",
            "/latest/meta-data/placement/region/",
            "/latest/meta-data/../user-data",
            "/",
        ] {
            assert_eq!(get(secret), Route::NotFound, "{secret}");
        }
    }

    #[test]
    fn only_plain_paths_pass() {
        for ok in [
            "/latest/meta-data/iam/security-credentials/",
            "/latest/api/token",
            "/latest/meta-data/iam/security-credentials/ci-role",
        ] {
            assert!(is_plain_path(ok), "{ok}");
        }
        for odd in [
            "/latest/meta-data/../user-data",
            "/latest//user-data",
            "/latest/meta-data/%2e%2e/user-data",
            "/latest/./meta-data",
            "latest/meta-data",
            "/latest/meta-data/iam/info;x",
            "/latest/meta-data/iam/info\\",
        ] {
            assert!(!is_plain_path(odd), "{odd}");
        }
    }

    #[test]
    fn times_look_like_imds() {
        let t = UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(imds_time(t), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn credentials_document_has_the_imds_shape() {
        let c = Credentials {
            access_key_id: "ASIAX".into(),
            secret_access_key: crate::credentials::Secret::new("s".into()),
            session_token: crate::credentials::Secret::new("t".into()),
            expiration: UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
            last_updated: UNIX_EPOCH,
            assumed_role_arn: String::new(),
        };
        let doc: serde_json::Value =
            serde_json::to_value(CredentialsDocument::new(&c, None)).unwrap();
        assert_eq!(doc["Code"], "Success");
        assert_eq!(doc["Type"], "AWS-HMAC");
        assert_eq!(doc["AccessKeyId"], "ASIAX");
        assert_eq!(doc["SecretAccessKey"], "s");
        assert_eq!(doc["Token"], "t");
        assert_eq!(doc["Expiration"], "2023-11-14T22:13:20Z");
        assert!(doc.get("AccountId").is_none());
        let ext: serde_json::Value =
            serde_json::to_value(CredentialsDocument::new(&c, Some("123456789012".into())))
                .unwrap();
        assert_eq!(ext["AccountId"], "123456789012");
    }
}
