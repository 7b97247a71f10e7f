//! The issuer's keys over HTTP: its OpenID discovery document, then the
//! JWKS it points to. HTTPS, verified against the system's roots; plain
//! HTTP only for an issuer on a loopback address (a test bed).

use std::{net::IpAddr, time::Duration};

use bytes::Bytes;
use futures_util::{future::BoxFuture, FutureExt as _};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::Uri;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use jsonwebtoken::jwk::JwkSet;

use super::KeySource;

/// A discovery document or JWKS larger than this is refused.
const MAX_DOCUMENT: usize = 1 << 20;
/// Each fetch, connect to last byte.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssuerUrlError {
    #[error("{0:?} is not an http(s) URL with a host")]
    NotUrl(String),
    #[error("{0:?}: plain http is only for an issuer on a loopback address; use https")]
    PlainHttp(String),
    #[error("{0:?}: an issuer URL has no query or fragment")]
    Query(String),
}

/// The issuer URL as GitLab writes it in `iss`: no trailing slash.
pub fn issuer_url(raw: &str) -> Result<String, IssuerUrlError> {
    let trimmed = raw.trim_end_matches('/');
    if trimmed.contains(['?', '#']) {
        return Err(IssuerUrlError::Query(raw.to_string()));
    }
    let uri: Uri = trimmed
        .parse()
        .map_err(|_| IssuerUrlError::NotUrl(raw.to_string()))?;
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| IssuerUrlError::NotUrl(raw.to_string()))?;
    match uri.scheme_str() {
        Some("https") => Ok(trimmed.to_string()),
        Some("http") if is_loopback(host) => Ok(trimmed.to_string()),
        Some("http") => Err(IssuerUrlError::PlainHttp(raw.to_string())),
        _ => Err(IssuerUrlError::NotUrl(raw.to_string())),
    }
}

fn is_loopback(host: &str) -> bool {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// Whether `url` has the scheme, host and port of `issuer`: GitLab serves
/// its keys itself, and a document pointing elsewhere (another host, plain
/// http) is not to be followed.
fn same_origin(url: &str, issuer: &str) -> bool {
    let origin = |u: &str| {
        u.parse::<Uri>()
            .ok()
            .and_then(|u| Some((u.scheme_str()?.to_string(), u.authority()?.to_string())))
    };
    origin(url).is_some() && origin(url) == origin(issuer)
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// The issuer's keys, from its discovery document.
pub struct Discovery {
    issuer: String,
    client: Client<Https, Empty<Bytes>>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
struct Document {
    issuer: String,
    jwks_uri: String,
}

impl Discovery {
    /// `issuer` as [`issuer_url`] gives it.
    pub fn new(issuer: String) -> anyhow::Result<Self> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(rustls::crypto::aws_lc_rs::default_provider())?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
        Ok(Self { issuer, client })
    }

    async fn get(&self, url: &str) -> Result<Bytes, String> {
        // The same rule for every URL the issuer hands us as for the
        // issuer itself.
        issuer_url(url).map_err(|e| e.to_string())?;
        let uri: Uri = url.parse().map_err(|_| format!("{url:?}: not a URL"))?;
        let fetch = async {
            let resp = self
                .client
                .get(uri)
                .await
                .map_err(|e| format!("GET {url}: {:#}", anyhow::Error::new(e)))?;
            if !resp.status().is_success() {
                return Err(format!("GET {url}: HTTP {}", resp.status()));
            }
            Limited::new(resp.into_body(), MAX_DOCUMENT)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|e| format!("GET {url}: {e}"))
        };
        tokio::time::timeout(FETCH_TIMEOUT, fetch)
            .await
            .map_err(|_| format!("GET {url}: no answer within {FETCH_TIMEOUT:?}"))?
    }

    async fn keys(&self) -> Result<JwkSet, String> {
        let url = format!("{}/.well-known/openid-configuration", self.issuer);
        let doc: Document = serde_json::from_slice(&self.get(&url).await?)
            .map_err(|e| format!("{url}: not a discovery document: {e}"))?;
        if doc.issuer.trim_end_matches('/') != self.issuer {
            return Err(format!(
                "{url}: the document is for issuer {:?}, not {}",
                doc.issuer, self.issuer
            ));
        }
        if !same_origin(&doc.jwks_uri, &self.issuer) {
            return Err(format!(
                "{url}: jwks_uri {:?} is not on the issuer's own scheme and host ({})",
                doc.jwks_uri, self.issuer
            ));
        }
        let set: JwkSet = serde_json::from_slice(&self.get(&doc.jwks_uri).await?)
            .map_err(|e| format!("{}: not a JWKS: {e}", doc.jwks_uri))?;
        if set.keys.is_empty() {
            return Err(format!("{}: the JWKS has no keys", doc.jwks_uri));
        }
        Ok(set)
    }
}

impl KeySource for Discovery {
    fn fetch(&self) -> BoxFuture<'_, Result<JwkSet, String>> {
        self.keys().boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuer_urls_are_https_or_loopback_http() {
        assert_eq!(
            issuer_url("https://gitlab.example.com/").unwrap(),
            "https://gitlab.example.com"
        );
        assert_eq!(
            issuer_url("http://127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert!(issuer_url("http://[::1]:8080").is_ok());
        assert!(matches!(
            issuer_url("http://gitlab.example.com"),
            Err(IssuerUrlError::PlainHttp(_))
        ));
        // A name that resolves to loopback is still a name.
        assert!(issuer_url("http://localhost:8080").is_err());
        assert!(issuer_url("ftp://gitlab.example.com").is_err());
        assert!(issuer_url("gitlab.example.com").is_err());
        assert!(issuer_url("https://gitlab.example.com/?x=1").is_err());
    }

    #[test]
    fn the_keys_must_come_from_the_issuers_own_origin() {
        let issuer = "https://gitlab.example.com";
        assert!(same_origin(
            "https://gitlab.example.com/oauth/discovery/keys",
            issuer
        ));
        for other in [
            "http://gitlab.example.com/oauth/discovery/keys",
            "https://keys.example.net/jwks",
            "http://127.0.0.1:8080/jwks",
            "https://gitlab.example.com:8443/oauth/discovery/keys",
            "/oauth/discovery/keys",
        ] {
            assert!(!same_origin(other, issuer), "{other}");
        }
    }
}
