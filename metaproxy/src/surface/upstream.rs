//! The real IMDS, as the daemon reaches it: with its own IMDSv2 token for the
//! few allow-listed paths containers may read (cached, they do not change),
//! and as a plain pass-through for host processes.
//!
//! The endpoint is `AWS_EC2_METADATA_SERVICE_ENDPOINT` when set, like every
//! AWS SDK, else `http://169.254.169.254`. The probe skips the daemon's own
//! cgroup, so these requests reach the real service.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{future::BoxFuture, FutureExt as _};
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};

const TOKEN_TTL: u64 = 21_600;
const CACHE_FOR: Duration = Duration::from_secs(300);
/// The SDKs give IMDS about a second; so do we.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Request and response bodies bigger than this are not IMDS traffic.
pub const MAX_BODY: usize = 1 << 20;

/// The real IMDS, as the IMDS surface needs it (HTTP to the service; a
/// table in tests).
pub trait Upstream: Send + Sync + 'static {
    /// GET an allow-listed, non-secret `path` with the daemon's own token.
    fn get_cached<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Bytes, UpstreamError>>;

    /// Whether the instance requires IMDSv2: a tokenless GET is refused
    /// with 401 (`HttpTokens=required`).
    fn requires_tokens(&self) -> BoxFuture<'_, Result<bool, UpstreamError>>;

    /// Forwards a host process's request unchanged (method, path, headers,
    /// body) and returns the service's answer unchanged.
    fn forward<'a>(
        &'a self,
        method: Method,
        path_and_query: &'a str,
        headers: &'a hyper::HeaderMap,
        body: Bytes,
    ) -> BoxFuture<'a, Result<Response<Bytes>, UpstreamError>>;
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("IMDS request failed: {0}")]
    Request(String),
    #[error("IMDS did not answer within {TIMEOUT:?}")]
    Timeout,
    #[error("IMDS answered {0}")]
    Status(StatusCode),
}

pub struct HttpUpstream {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
    cache: Mutex<HashMap<String, (Bytes, Instant)>>,
}

impl std::fmt::Debug for HttpUpstream {
    // By hand: the derived one would print the daemon's IMDS token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpUpstream")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl HttpUpstream {
    pub fn from_env() -> Self {
        let base = std::env::var("AWS_EC2_METADATA_SERVICE_ENDPOINT")
            .unwrap_or_else(|_| "http://169.254.169.254".into())
            .trim_end_matches('/')
            .to_string();
        Self::new(base)
    }

    pub fn new(base: String) -> Self {
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        Self {
            base,
            client,
            token: tokio::sync::Mutex::new(None),
            cache: Mutex::new(HashMap::new()),
        }
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Bytes>, UpstreamError> {
        let resp = tokio::time::timeout(TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| UpstreamError::Timeout)?
            .map_err(|e| UpstreamError::Request(e.to_string()))?;
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(
            TIMEOUT,
            http_body_util::Limited::new(body, MAX_BODY).collect(),
        )
        .await
        .map_err(|_| UpstreamError::Timeout)?
        .map_err(|e| UpstreamError::Request(e.to_string()))?
        .to_bytes();
        Ok(Response::from_parts(parts, body))
    }

    async fn token(&self, renew: bool) -> Result<String, UpstreamError> {
        let mut cached = self.token.lock().await;
        if let Some((token, until)) = cached.as_ref() {
            if !renew && Instant::now() < *until {
                return Ok(token.clone());
            }
        }
        let req = Request::put(format!("{}/latest/api/token", self.base))
            .header("x-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL)
            .body(Full::default())
            .expect("valid request");
        let resp = self.send(req).await?;
        if !resp.status().is_success() {
            return Err(UpstreamError::Status(resp.status()));
        }
        let token = String::from_utf8_lossy(resp.body()).into_owned();
        // Renew well before the service forgets it.
        *cached = Some((
            token.clone(),
            Instant::now() + Duration::from_secs(TOKEN_TTL / 2),
        ));
        Ok(token)
    }

    /// GET `path` with the daemon's own token; successful answers are cached.
    async fn get_cached_inner(&self, path: &str) -> Result<Bytes, UpstreamError> {
        if let Some((body, at)) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
        {
            if at.elapsed() < CACHE_FOR {
                return Ok(body.clone());
            }
        }
        let mut renew = false;
        loop {
            let token = self.token(renew).await?;
            let req = Request::get(format!("{}{path}", self.base))
                .header("x-aws-ec2-metadata-token", sensitive(&token)?)
                .body(Full::default())
                .expect("valid request");
            let resp = self.send(req).await?;
            match resp.status() {
                StatusCode::OK => {
                    let body = resp.into_body();
                    self.cache
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(path.to_string(), (body.clone(), Instant::now()));
                    return Ok(body);
                }
                StatusCode::UNAUTHORIZED if !renew => renew = true,
                other => return Err(UpstreamError::Status(other)),
            }
        }
    }

    async fn forward_inner(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &hyper::HeaderMap,
        body: Bytes,
    ) -> Result<Response<Bytes>, UpstreamError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path_and_query}", self.base));
        for (name, value) in headers {
            if !is_hop_by_hop(name) {
                let mut value = value.clone();
                // Never printed by hyper's Debug, whatever logs a request.
                value.set_sensitive(true);
                req = req.header(name, value);
            }
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| UpstreamError::Request(e.to_string()))?;
        self.send(req).await
    }
}

impl Upstream for HttpUpstream {
    fn get_cached<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Bytes, UpstreamError>> {
        self.get_cached_inner(path).boxed()
    }

    fn requires_tokens(&self) -> BoxFuture<'_, Result<bool, UpstreamError>> {
        async move {
            let req = Request::get(format!("{}/latest/meta-data/", self.base))
                .body(Full::default())
                .expect("valid request");
            // Only 401 says "token required"; any other answer (200, or a
            // 404 for a path it does not serve) was given without one.
            Ok(self.send(req).await?.status() == StatusCode::UNAUTHORIZED)
        }
        .boxed()
    }

    fn forward<'a>(
        &'a self,
        method: Method,
        path_and_query: &'a str,
        headers: &'a hyper::HeaderMap,
        body: Bytes,
    ) -> BoxFuture<'a, Result<Response<Bytes>, UpstreamError>> {
        self.forward_inner(method, path_and_query, headers, body)
            .boxed()
    }
}

/// A header value that hyper's `Debug` prints as `Sensitive`.
fn sensitive(value: &str) -> Result<hyper::header::HeaderValue, UpstreamError> {
    let mut v = hyper::header::HeaderValue::from_str(value)
        .map_err(|_| UpstreamError::Request("IMDS returned an unusable token".into()))?;
    v.set_sensitive(true);
    Ok(v)
}

fn is_hop_by_hop(name: &hyper::header::HeaderName) -> bool {
    use hyper::header::{
        CONNECTION, HOST, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING,
        UPGRADE,
    };
    [
        CONNECTION,
        TRANSFER_ENCODING,
        TE,
        TRAILER,
        UPGRADE,
        PROXY_AUTHORIZATION,
        PROXY_AUTHENTICATE,
        HOST,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
}
