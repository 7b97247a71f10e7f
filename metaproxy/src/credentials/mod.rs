//! Role credentials from STS: AssumeRole with the instance profile's own
//! short-lived credentials, cached per (role ARN, external id, session name).
//!
//! * prefetched when a container with a role starts (the cache subscribes
//!   to identity's container events) and dropped when the last container
//!   using them goes;
//! * refreshed well before expiry, never served with too little left;
//! * one STS call however many requests wait for it (single flight), and
//!   a failure is shared by the waiters and remembered briefly, with
//!   backoff and jitter, so an STS outage costs a bounded number of calls;
//! * still-valid credentials kept while STS is failing.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, OnceLock, RwLock},
    time::{Duration, Instant, SystemTime},
};

use futures_util::{future::BoxFuture, FutureExt as _};
use tokio::{sync::broadcast, task::JoinSet};

use crate::{
    model::container::ContainerEvent,
    model::ids::{AccountId, ContainerId, RoleArn},
    model::session::Session,
    ops::metrics::{self, CacheMetrics, ErrorLabels, OperationLabels, StsMetrics},
    policy::{Policy, Role, RoleDecision},
};

/// Never hand out credentials with less than this left: SDKs refresh 10-15
/// minutes before Expiration, and would otherwise come back at once.
pub const SERVE_MIN_REMAINING: Duration = Duration::from_secs(20 * 60);
/// The refresher renews credentials with less than this left, so requests
/// find fresh ones in the cache.
const REFRESH_AHEAD: Duration = Duration::from_secs(30 * 60);
/// When STS fails, credentials with at least this left are still served.
const STALE_MIN_REMAINING: Duration = Duration::from_secs(60);
/// Entries nobody asked for in this long are dropped instead of renewed
/// (a container whose end we missed, say); a later request fetches anew.
const IDLE_EVICT: Duration = Duration::from_secs(2 * 3600);
/// After a failed AssumeRole, requests get the same failure for this long
/// (doubling per consecutive failure up to [`FAILURE_BACKOFF_MAX`]).
const FAILURE_BACKOFF: Duration = Duration::from_secs(1);
const FAILURE_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Role chaining (the instance profile's session assuming a role) caps
/// DurationSeconds at one hour.
pub const DURATION_SECONDS: i32 = 3600;

/// What to assume. Two containers share credentials only if all three agree.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CredKey {
    pub role_arn: RoleArn,
    pub external_id: Option<String>,
    pub session_name: String,
    /// Tags and SourceIdentity: two jobs never share a tagged session.
    pub session: Session,
}

impl From<&Role> for CredKey {
    fn from(role: &Role) -> Self {
        Self {
            role_arn: role.arn.clone(),
            external_id: role.external_id.clone(),
            session_name: role.session_name.clone(),
            session: role.session.clone(),
        }
    }
}

/// A secret string: never printed, by `Debug` or anything else.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Short-lived credentials for one role session.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Secret,
    pub expiration: SystemTime,
    pub last_updated: SystemTime,
    /// `arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION`
    pub assumed_role_arn: String,
}

/// Credentials as the cache hands them out: shared (no copy per request),
/// with the answers rendered from them kept, since they never change: each
/// document is serialised once per refresh, not once per request.
pub struct Issued {
    credentials: Credentials,
    rendered: [OnceLock<bytes::Bytes>; 3],
    /// Containers these credentials have been handed to.
    handed_to: Mutex<HashSet<ContainerId>>,
}

/// The renderings [`Issued`] keeps.
#[derive(Debug, Clone, Copy)]
pub enum Rendering {
    Imds = 0,
    ImdsExtended = 1,
    ContainerCredentials = 2,
}

impl Issued {
    pub fn new(credentials: Credentials) -> Self {
        Self {
            credentials,
            rendered: Default::default(),
            handed_to: Mutex::default(),
        }
    }

    /// Whether this is the first time these credentials go to `container`
    /// (what the audit line records; repeats are only counted).
    pub fn first_for(&self, container: &ContainerId) -> bool {
        let mut seen = self.handed_to.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(container) {
            return false;
        }
        seen.insert(container.clone());
        true
    }

    /// The `which` rendering, made by `render` the first time.
    pub fn rendered(
        &self,
        which: Rendering,
        render: impl FnOnce(&Credentials) -> bytes::Bytes,
    ) -> bytes::Bytes {
        self.rendered[which as usize]
            .get_or_init(|| render(&self.credentials))
            .clone()
    }
}

/// The renderings hold the secrets in the clear: never printed.
impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for Issued {
    type Target = Credentials;

    fn deref(&self) -> &Credentials {
        &self.credentials
    }
}

impl Credentials {
    pub fn remaining(&self) -> Duration {
        self.expiration
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialsError {
    #[error("AssumeRole {role_arn} failed: {message}")]
    AssumeRole {
        role_arn: RoleArn,
        /// STS's error code (`AccessDenied`, ...), when it sent one.
        code: Option<String>,
        message: String,
    },
    #[error("AssumeRole {0} returned no credentials")]
    Empty(RoleArn),
    #[error("STS has not answered within {0:?}; still trying")]
    Timeout(Duration),
    #[error("credential fetch failed: {0}")]
    Task(String),
    #[error("GetCallerIdentity failed: {0}")]
    CallerIdentity(String),
}

impl CredentialsError {
    /// An AccessDenied for a session with tags or SourceIdentity names what
    /// the role's trust policy is missing.
    fn with_session_hint(self, session: &Session) -> Self {
        let Self::AssumeRole {
            role_arn,
            code,
            message,
        } = self
        else {
            return self;
        };
        let hint = if code.as_deref() != Some("AccessDenied") || session.is_empty() {
            None
        } else if message.contains("sts:TagSession") {
            Some("the role's trust policy does not allow sts:TagSession for the instance role: allow it, or turn --session-tags off")
        } else if message.contains("sts:SetSourceIdentity") {
            Some("the role's trust policy does not allow sts:SetSourceIdentity for the instance role: allow it, or turn --source-identity off")
        } else {
            Some("session tags or SourceIdentity are on: the role's trust policy must allow sts:TagSession and sts:SetSourceIdentity as well as sts:AssumeRole")
        };
        Self::AssumeRole {
            role_arn,
            message: match hint {
                Some(hint) => format!("{message} ({hint})"),
                None => message,
            },
            code,
        }
    }

    /// STS's error code, as a bounded metrics label.
    fn code_label(&self) -> &'static str {
        match self {
            Self::AssumeRole { code, .. } => metrics::sts_error_code(code.as_deref()),
            _ => "none",
        }
    }
}

/// Who the daemon itself is, according to STS.
#[derive(Debug, Clone)]
pub struct CallerIdentity {
    pub account: AccountId,
    pub arn: String,
}

/// STS, as the daemon uses it (aws-sdk-sts; a fake in tests).
pub trait Sts: Send + Sync + 'static {
    fn assume_role<'a>(
        &'a self,
        key: &'a CredKey,
    ) -> BoxFuture<'a, Result<Credentials, CredentialsError>>;

    /// GetCallerIdentity with the daemon's own credentials.
    fn caller_identity(&self) -> BoxFuture<'_, Result<CallerIdentity, CredentialsError>>;
}

/// STS through the AWS SDK, with the daemon's own credentials.
#[derive(Debug, Clone)]
pub struct AwsSts(pub aws_sdk_sts::Client);

impl AwsSts {
    /// A client from aws-config's standard chain (on EC2: the instance
    /// profile, from the real IMDS), so the usual variables
    /// (AWS_EC2_METADATA_SERVICE_ENDPOINT, AWS_ENDPOINT_URL_STS, AWS_REGION)
    /// work. STS down or hanging must not hold requests (or the single
    /// flight) forever, hence the timeouts.
    pub async fn from_env() -> Self {
        let aws = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        let timeouts = aws_sdk_sts::config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(2))
            .operation_attempt_timeout(Duration::from_secs(5))
            .operation_timeout(Duration::from_secs(15))
            .build();
        Self(aws_sdk_sts::Client::from_conf(
            aws_sdk_sts::config::Builder::from(&aws)
                .timeout_config(timeouts)
                .build(),
        ))
    }
}

impl Sts for AwsSts {
    fn assume_role<'a>(
        &'a self,
        key: &'a CredKey,
    ) -> BoxFuture<'a, Result<Credentials, CredentialsError>> {
        async move {
            let tags = key
                .session
                .tags
                .iter()
                .map(|(k, v)| aws_sdk_sts::types::Tag::builder().key(k).value(v).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| CredentialsError::Task(format!("session tags: {e}")))?;
            let transitive = (key.session.transitive && !tags.is_empty())
                .then(|| key.session.tags.iter().map(|(k, _)| k.clone()).collect());
            let out = self
                .0
                .assume_role()
                .role_arn(key.role_arn.as_str())
                .role_session_name(&key.session_name)
                .duration_seconds(DURATION_SECONDS)
                .set_external_id(key.external_id.clone())
                .set_tags((!tags.is_empty()).then_some(tags))
                .set_transitive_tag_keys(transitive)
                .set_source_identity(key.session.source_identity.clone())
                .send()
                .await
                .map_err(|e| {
                    use aws_sdk_sts::error::ProvideErrorMetadata as _;
                    CredentialsError::AssumeRole {
                        role_arn: key.role_arn.clone(),
                        code: e.code().map(str::to_owned),
                        message: aws_sdk_sts::error::DisplayErrorContext(e).to_string(),
                    }
                })?;
            let creds = out
                .credentials
                .ok_or_else(|| CredentialsError::Empty(key.role_arn.clone()))?;
            let expiration = SystemTime::try_from(creds.expiration)
                .map_err(|_| CredentialsError::Empty(key.role_arn.clone()))?;
            Ok(Credentials {
                access_key_id: creds.access_key_id,
                secret_access_key: Secret::new(creds.secret_access_key),
                session_token: Secret::new(creds.session_token),
                expiration,
                last_updated: SystemTime::now(),
                assumed_role_arn: out.assumed_role_user.map(|u| u.arn).unwrap_or_default(),
            })
        }
        .boxed()
    }

    fn caller_identity(&self) -> BoxFuture<'_, Result<CallerIdentity, CredentialsError>> {
        async move {
            let out = self.0.get_caller_identity().send().await.map_err(|e| {
                CredentialsError::CallerIdentity(
                    aws_sdk_sts::error::DisplayErrorContext(e).to_string(),
                )
            })?;
            let account = out
                .account
                .as_deref()
                .and_then(AccountId::parse)
                .ok_or_else(|| {
                    CredentialsError::CallerIdentity("no account in the answer".into())
                })?;
            Ok(CallerIdentity {
                account,
                arn: out.arn.unwrap_or_default(),
            })
        }
        .boxed()
    }
}

/// An [`Sts`] that counts and times the calls it passes on.
pub struct InstrumentedSts {
    inner: Arc<dyn Sts>,
    metrics: StsMetrics,
}

impl std::fmt::Debug for InstrumentedSts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstrumentedSts").finish_non_exhaustive()
    }
}

impl InstrumentedSts {
    pub fn new(inner: Arc<dyn Sts>) -> Self {
        Self {
            inner,
            metrics: StsMetrics::default(),
        }
    }

    pub fn metrics(&self) -> &StsMetrics {
        &self.metrics
    }

    async fn measure<T>(
        &self,
        operation: &'static str,
        call: BoxFuture<'_, Result<T, CredentialsError>>,
    ) -> Result<T, CredentialsError> {
        let labels = OperationLabels { operation };
        self.metrics.calls.get_or_create(&labels).inc();
        self.metrics.in_flight.inc();
        let started = Instant::now();
        let result = call.await;
        self.metrics.in_flight.dec();
        self.metrics
            .duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.metrics
                .errors
                .get_or_create(&ErrorLabels {
                    operation,
                    code: e.code_label(),
                })
                .inc();
        }
        result
    }
}

impl Sts for InstrumentedSts {
    fn assume_role<'a>(
        &'a self,
        key: &'a CredKey,
    ) -> BoxFuture<'a, Result<Credentials, CredentialsError>> {
        self.measure("AssumeRole", self.inner.assume_role(key))
            .boxed()
    }

    fn caller_identity(&self) -> BoxFuture<'_, Result<CallerIdentity, CredentialsError>> {
        self.measure("GetCallerIdentity", self.inner.caller_identity())
            .boxed()
    }
}

#[derive(Debug)]
struct Failure {
    error: CredentialsError,
    retry_at: Instant,
    streak: u32,
}

#[derive(Debug)]
struct Slot {
    value: RwLock<Option<Arc<Issued>>>,
    /// Held while calling STS: the single flight.
    fetching: tokio::sync::Mutex<()>,
    last_used: Mutex<Instant>,
    failure: Mutex<Option<Failure>>,
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            value: RwLock::default(),
            fetching: tokio::sync::Mutex::default(),
            last_used: Mutex::new(Instant::now()),
            failure: Mutex::default(),
        }
    }
}

impl Slot {
    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn idle(&self) -> Duration {
        self.last_used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    fn fresh(&self, min_remaining: Duration) -> Option<Arc<Issued>> {
        let value = self.value.read().unwrap_or_else(|e| e.into_inner());
        value
            .as_ref()
            .filter(|c| c.remaining() >= min_remaining)
            .cloned()
    }

    /// The last failure, while it still stands.
    fn recent_failure(&self) -> Option<CredentialsError> {
        let failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        failure
            .as_ref()
            .filter(|f| Instant::now() < f.retry_at)
            .map(|f| f.error.clone())
    }

    /// Keeps new credentials (and hands them back, shared), or remembers
    /// the failure.
    fn record(
        &self,
        result: Result<Credentials, CredentialsError>,
    ) -> Result<Arc<Issued>, CredentialsError> {
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(c) => {
                let issued = Arc::new(Issued::new(c));
                *self.value.write().unwrap_or_else(|e| e.into_inner()) = Some(issued.clone());
                *failure = None;
                Ok(issued)
            }
            Err(error) => {
                let streak = failure.as_ref().map_or(1, |f| f.streak.saturating_add(1));
                *failure = Some(Failure {
                    error: error.clone(),
                    retry_at: Instant::now() + backoff(streak),
                    streak,
                });
                Err(error)
            }
        }
    }
}

/// How long failure number `streak` (1, 2, ...) stands: doubling from
/// [`FAILURE_BACKOFF`] to [`FAILURE_BACKOFF_MAX`], less up to a fifth at
/// random so that many roles do not retry in step.
fn backoff(streak: u32) -> Duration {
    let base = FAILURE_BACKOFF
        .saturating_mul(1 << streak.saturating_sub(1).min(16))
        .min(FAILURE_BACKOFF_MAX);
    let mut r = [0u8; 2];
    let _ = getrandom::fill(&mut r);
    let fifth = base / 5;
    base - fifth.mul_f64(f64::from(u16::from_ne_bytes(r)) / f64::from(u16::MAX))
}

/// The credential cache. Share it as `Arc`.
pub struct CredentialCache {
    sts: Arc<dyn Sts>,
    slots: Mutex<HashMap<CredKey, Arc<Slot>>>,
    /// Which containers use which keys, so credentials go with the last
    /// container that used them.
    owners: Mutex<HashMap<ContainerId, HashSet<CredKey>>>,
    /// Fetches that outlive the request that started them.
    background: Mutex<JoinSet<()>>,
    metrics: CacheMetrics,
}

impl std::fmt::Debug for CredentialCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialCache")
            .field("entries", &self.len())
            .finish_non_exhaustive()
    }
}

impl CredentialCache {
    pub fn new(sts: Arc<dyn Sts>) -> Self {
        Self {
            sts,
            slots: Mutex::new(HashMap::new()),
            owners: Mutex::new(HashMap::new()),
            background: Mutex::new(JoinSet::new()),
            metrics: CacheMetrics::default(),
        }
    }

    pub fn metrics(&self) -> &CacheMetrics {
        &self.metrics
    }

    /// How many credential entries are cached.
    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn slot(&self, key: &CredKey) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        // Found without copying the key: every request after the first.
        if let Some(slot) = slots.get(key) {
            return slot.clone();
        }
        slots.entry(key.clone()).or_default().clone()
    }

    fn own(&self, owner: &ContainerId, key: &CredKey) {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        if owners.get(owner).is_some_and(|keys| keys.contains(key)) {
            return;
        }
        owners.entry(owner.clone()).or_default().insert(key.clone());
    }

    /// Credentials for `key` with at least [`SERVE_MIN_REMAINING`] left,
    /// for container `owner`. Waits at most `wait` for STS; the fetch goes
    /// on in the background after that, so a slow STS fills the cache for
    /// the caller's retry instead of being abandoned.
    pub async fn get(
        self: &Arc<Self>,
        key: &CredKey,
        owner: &ContainerId,
        wait: Duration,
    ) -> Result<Arc<Issued>, CredentialsError> {
        self.own(owner, key);
        let slot = self.slot(key);
        slot.touch();
        if let Some(c) = slot.fresh(SERVE_MIN_REMAINING) {
            self.metrics.lookup("hit");
            return Ok(c);
        }
        if let Some(e) = slot.recent_failure() {
            self.metrics.lookup("failing");
            return Err(e);
        }
        self.metrics.lookup("miss");
        let (this, key) = (self.clone(), key.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.spawn(async move {
            let _ = tx.send(this.fetch(&key).await);
        });
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(CredentialsError::Task("the fetch task died".into())),
            Err(_) => Err(CredentialsError::Timeout(wait)),
        }
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.background.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(done) = tasks.try_join_next() {
            if let Err(e) = done {
                tracing::error!(error = %e, "credential fetch task failed");
            }
        }
        tasks.spawn(task);
    }

    /// Through the single flight: whoever held it before us may have just
    /// fetched, or just failed.
    async fn fetch(&self, key: &CredKey) -> Result<Arc<Issued>, CredentialsError> {
        let slot = self.slot(key);
        let _flight = slot.fetching.lock().await;
        if let Some(c) = slot.fresh(SERVE_MIN_REMAINING) {
            return Ok(c);
        }
        if let Some(e) = slot.recent_failure() {
            return Err(e);
        }
        self.fetch_into(key, &slot).await
    }

    async fn fetch_into(
        &self,
        key: &CredKey,
        slot: &Slot,
    ) -> Result<Arc<Issued>, CredentialsError> {
        let result = self
            .sts
            .assume_role(key)
            .await
            .map_err(|e| e.with_session_hint(&key.session));
        match slot.record(result) {
            Ok(c) => {
                tracing::info!(
                    role_arn = %key.role_arn,
                    assumed_role_arn = %c.assumed_role_arn,
                    session = %key.session_name,
                    access_key_id = %c.access_key_id,
                    expiration = %humantime::format_rfc3339_seconds(c.expiration),
                    "assumed role"
                );
                Ok(c)
            }
            Err(e) => match slot.fresh(STALE_MIN_REMAINING) {
                Some(c) => {
                    tracing::warn!(error = %e, remaining_s = c.remaining().as_secs(), "sts failing; serving cached credentials");
                    Ok(c)
                }
                None => {
                    tracing::warn!(role_arn = %key.role_arn, error = %e, "assume role failed");
                    Err(e)
                }
            },
        }
    }

    /// Drops the keys container `id` used, unless another container still
    /// uses them.
    fn container_gone(&self, id: &ContainerId) {
        let gone = {
            let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
            let Some(keys) = owners.remove(id) else {
                return;
            };
            keys.into_iter()
                .filter(|k| !owners.values().any(|ks| ks.contains(k)))
                .collect::<Vec<_>>()
        };
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        for key in gone {
            slots.remove(&key);
        }
    }

    /// Acts on identity's container events forever: prefetches credentials
    /// for containers that start with a role (as `policy` decides), drops
    /// them when their containers are gone. Run it as a task.
    pub async fn follow(
        self: Arc<Self>,
        mut events: broadcast::Receiver<ContainerEvent>,
        policy: Arc<Policy>,
    ) {
        loop {
            match events.recv().await {
                Ok(ContainerEvent::Started(c)) => {
                    let RoleDecision::Role(role) = policy.decide(&c) else {
                        continue;
                    };
                    let key = CredKey::from(&role);
                    self.own(&c.id, &key);
                    tracing::info!(container_id = %c.id, container = %crate::ops::logging::Clean(&c.name), role_arn = %key.role_arn, "prefetching credentials");
                    let this = self.clone();
                    self.spawn(async move {
                        if let Err(e) = this.fetch(&key).await {
                            tracing::warn!(error = %e, "prefetch failed");
                        }
                    });
                }
                Ok(ContainerEvent::Gone(id)) => self.container_gone(&id),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "container events: fell behind");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Renews, forever, every cached entry with less than [`REFRESH_AHEAD`]
    /// left, so requests never wait on STS; drops entries idle for
    /// [`IDLE_EVICT`]. Run it as a task.
    pub async fn refresh_ahead(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            self.refresh_due().await;
        }
    }

    /// One pass of the refresher: renew what is due, drop what is idle.
    pub async fn refresh_due(&self) {
        let due: Vec<(CredKey, Arc<Slot>)> = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.retain(|_, slot| slot.idle() < IDLE_EVICT);
            // Owners whose keys are gone (a missed stop event, say) go too.
            let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
            owners.retain(|_, keys| {
                keys.retain(|k| slots.contains_key(k));
                !keys.is_empty()
            });
            drop(owners);
            slots
                .iter()
                .filter(|(_, slot)| {
                    slot.fresh(REFRESH_AHEAD).is_none() && slot.recent_failure().is_none()
                })
                .map(|(k, s)| (k.clone(), s.clone()))
                .collect()
        };
        for (key, slot) in due {
            let _flight = slot.fetching.lock().await;
            if slot.fresh(REFRESH_AHEAD).is_none() {
                let _ = self.fetch_into(&key, &slot).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let c = Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: Secret::new("very-secret".into()),
            session_token: Secret::new("token-secret".into()),
            expiration: SystemTime::now(),
            last_updated: SystemTime::now(),
            assumed_role_arn: String::new(),
        };
        let printed = format!("{c:?}");
        assert!(printed.contains("ASIAEXAMPLE"));
        assert!(
            !printed.contains("very-secret") && !printed.contains("token-secret"),
            "{printed}"
        );
        // Nor once rendered into an answer that the cache keeps.
        let issued = Issued::new(c);
        let body = issued.rendered(Rendering::Imds, |c| {
            bytes::Bytes::from(c.secret_access_key.expose().to_string())
        });
        assert_eq!(body, "very-secret");
        let printed = format!("{issued:?}");
        assert!(printed.contains("ASIAEXAMPLE"));
        assert!(!printed.contains("very-secret"), "{printed}");
    }

    #[test]
    fn backoff_doubles_to_a_cap_with_jitter_below() {
        for (streak, base) in [(1, 1), (2, 2), (3, 4), (6, 30), (40, 30)] {
            let d = backoff(streak);
            let base = Duration::from_secs(base);
            assert!(d <= base && d >= base - base / 5, "{streak}: {d:?}");
        }
    }
}
