//! The IMDS routes a container may use, decided from method and path alone.
//! Deliberately short: anything not listed here is 404 and never forwarded.

use crate::ops::metrics::RouteLabel;
use hyper::Method;

pub const TOKEN_PATH: &str = "/latest/api/token";
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
pub const MAX_TTL: u64 = 21_600;
const CREDS_PREFIX: &str = "/latest/meta-data/iam/security-credentials";
const CREDS_EXT_PREFIX: &str = "/latest/meta-data/iam/security-credentials-extended";

/// Non-secret metadata that SDKs and tools read, fetched for containers from
/// the real IMDS. No user-data, no identity signatures (they would let a job
/// pose as the instance), no network details.
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

/// What a container's request asks for, decided from method and path alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
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
    /// The route's name, a bounded label for metrics.
    pub fn label(&self) -> RouteLabel {
        match self {
            Self::Token => RouteLabel::Token,
            Self::RoleListing => RouteLabel::RoleListing,
            Self::Credentials { .. } => RouteLabel::Credentials,
            Self::IamInfo => RouteLabel::IamInfo,
            Self::Metadata(_) => RouteLabel::Metadata,
            Self::MethodNotAllowed | Self::NotFound => RouteLabel::Other,
        }
    }

    pub fn of(method: &Method, path: &'a str, query: Option<&str>) -> Self {
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
}
