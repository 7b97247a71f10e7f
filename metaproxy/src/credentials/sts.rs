//! STS behind a trait: aws-sdk-sts for the daemon, fakes in tests; and a
//! wrapper that counts and times every call.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use futures_util::{future::BoxFuture, FutureExt as _};

use super::{CredKey, Credentials, CredentialsError, Secret, DURATION_SECONDS};
use crate::{
    model::ids::AccountId,
    ops::metrics::{ErrorLabels, OperationLabels, StsMetrics},
};

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

    /// `key` assumed for the shortest time STS allows, to learn whether the
    /// role's trust policy lets us (`metaproxy doctor`); the credentials
    /// are dropped at once.
    fn try_assume_role<'a>(
        &'a self,
        key: &'a CredKey,
    ) -> BoxFuture<'a, Result<(), CredentialsError>> {
        async move { self.assume_role(key).await.map(|_| ()) }.boxed()
    }
}

/// The shortest DurationSeconds STS takes.
pub const SHORTEST_DURATION_SECONDS: i32 = 900;

/// STS through the AWS SDK: AssumeRole and GetCallerIdentity with the
/// daemon's own credentials; AssumeRoleWithWebIdentity through a client
/// that has none at all (the call is unsigned: the job's token is the
/// only proof), so it works on a host whose instance profile has no rights,
/// or no instance profile.
#[derive(Debug, Clone)]
pub struct AwsSts {
    signed: aws_sdk_sts::Client,
    anonymous: aws_sdk_sts::Client,
}

impl AwsSts {
    /// A client from aws-config's standard chain (on EC2: the instance
    /// profile, from the real IMDS), so the usual variables
    /// (AWS_EC2_METADATA_SERVICE_ENDPOINT, AWS_ENDPOINT_URL_STS, AWS_REGION)
    /// work. STS down or hanging must not hold requests (or the single
    /// flight) forever, hence the timeouts.
    pub async fn from_env() -> Self {
        let timeouts = aws_sdk_sts::config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(2))
            .operation_attempt_timeout(Duration::from_secs(5))
            .operation_timeout(Duration::from_secs(15))
            .build();
        let client = |aws: &aws_config::SdkConfig| {
            aws_sdk_sts::Client::from_conf(
                aws_sdk_sts::config::Builder::from(aws)
                    .timeout_config(timeouts.clone())
                    .build(),
            )
        };
        let signed = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        let anonymous = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .no_credentials()
            .load()
            .await;
        Self {
            signed: client(&signed),
            anonymous: client(&anonymous),
        }
    }

    /// `key` assumed for `duration` seconds: AssumeRole with the daemon's
    /// credentials, or AssumeRoleWithWebIdentity with the job's token.
    async fn assume_role_for(
        &self,
        key: &CredKey,
        duration: i32,
    ) -> Result<Credentials, CredentialsError> {
        if let Some(web) = &key.id_token {
            return self
                .assume_role_with_web_identity(key, web.token.expose(), duration)
                .await;
        }
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
            .signed
            .assume_role()
            .role_arn(key.role_arn.as_str())
            .role_session_name(&key.session_name)
            .duration_seconds(duration)
            .set_external_id(key.external_id.clone())
            .set_tags((!tags.is_empty()).then_some(tags))
            .set_transitive_tag_keys(transitive)
            .set_source_identity(key.session.source_identity.clone())
            .send()
            .await
            .map_err(|e| sdk_error(key, e))?;
        credentials(key, out.credentials, out.assumed_role_user)
    }

    async fn assume_role_with_web_identity(
        &self,
        key: &CredKey,
        token: &str,
        duration: i32,
    ) -> Result<Credentials, CredentialsError> {
        let out = self
            .anonymous
            .assume_role_with_web_identity()
            .role_arn(key.role_arn.as_str())
            .role_session_name(&key.session_name)
            .web_identity_token(token)
            .duration_seconds(duration)
            .send()
            .await
            .map_err(|e| sdk_error(key, e))?;
        credentials(key, out.credentials, out.assumed_role_user)
    }
}

impl Sts for AwsSts {
    fn assume_role<'a>(
        &'a self,
        key: &'a CredKey,
    ) -> BoxFuture<'a, Result<Credentials, CredentialsError>> {
        self.assume_role_for(key, DURATION_SECONDS).boxed()
    }

    fn try_assume_role<'a>(
        &'a self,
        key: &'a CredKey,
    ) -> BoxFuture<'a, Result<(), CredentialsError>> {
        async move {
            self.assume_role_for(key, SHORTEST_DURATION_SECONDS)
                .await
                .map(|_| ())
        }
        .boxed()
    }

    fn caller_identity(&self) -> BoxFuture<'_, Result<CallerIdentity, CredentialsError>> {
        async move {
            let out = self
                .signed
                .get_caller_identity()
                .send()
                .await
                .map_err(|e| {
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

/// STS's error for `key`: its code and the whole context, never the token
/// (the SDK's errors hold no request parameters).
fn sdk_error<E, R>(key: &CredKey, e: aws_sdk_sts::error::SdkError<E, R>) -> CredentialsError
where
    E: aws_sdk_sts::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_sts::error::ProvideErrorMetadata as _;
    CredentialsError::AssumeRole {
        operation: key.operation(),
        role_arn: key.role_arn.clone(),
        code: e.code().map(str::to_owned),
        message: aws_sdk_sts::error::DisplayErrorContext(e).to_string(),
    }
}

/// STS's answer (to either call) as credentials; none is an error.
fn credentials(
    key: &CredKey,
    creds: Option<aws_sdk_sts::types::Credentials>,
    user: Option<aws_sdk_sts::types::AssumedRoleUser>,
) -> Result<Credentials, CredentialsError> {
    let creds = creds.ok_or_else(|| CredentialsError::Empty(key.role_arn.clone()))?;
    let expiration = SystemTime::try_from(creds.expiration)
        .map_err(|_| CredentialsError::Empty(key.role_arn.clone()))?;
    Ok(Credentials {
        access_key_id: creds.access_key_id,
        secret_access_key: Secret::new(creds.secret_access_key),
        session_token: Secret::new(creds.session_token),
        expiration,
        last_updated: SystemTime::now(),
        assumed_role_arn: user.map(|u| u.arn).unwrap_or_default(),
    })
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
        self.measure(key.operation(), self.inner.assume_role(key))
            .boxed()
    }

    fn caller_identity(&self) -> BoxFuture<'_, Result<CallerIdentity, CredentialsError>> {
        self.measure("GetCallerIdentity", self.inner.caller_identity())
            .boxed()
    }

    fn try_assume_role<'a>(
        &'a self,
        key: &'a CredKey,
    ) -> BoxFuture<'a, Result<(), CredentialsError>> {
        self.measure(key.operation(), self.inner.try_assume_role(key))
            .boxed()
    }
}
