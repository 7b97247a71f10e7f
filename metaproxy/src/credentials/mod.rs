//! Role credentials from STS: AssumeRole with the instance profile's own
//! short-lived credentials, or AssumeRoleWithWebIdentity with the job's own
//! GitLab ID token (an unsigned call: the daemon's credentials play no
//! part), cached per key (role ARN, external id, session name, session,
//! token).
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
    sync::OnceLock,
    time::{Duration, SystemTime},
};

mod cache;
mod sts;

pub use cache::CredentialCache;
pub use sts::{AwsSts, CallerIdentity, InstrumentedSts, Sts};

pub use crate::model::secret::Secret;
use crate::{
    model::{ids::RoleArn, session::Session},
    ops::metrics,
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
    /// Assume with this job's ID token (AssumeRoleWithWebIdentity, no
    /// credentials of the daemon's own), not with the instance profile.
    pub id_token: Option<IdTokenKey>,
}

/// A job's ID token, as the key to its role's credentials.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdTokenKey {
    pub token: Secret,
    /// The token's `exp`: past it, STS takes it no more, so the entry is
    /// neither refreshed nor served.
    pub expires: SystemTime,
}

impl CredKey {
    /// The STS operation that makes these credentials.
    pub fn operation(&self) -> &'static str {
        match self.id_token {
            Some(_) => "AssumeRoleWithWebIdentity",
            None => "AssumeRole",
        }
    }

    /// Whether STS could still make these credentials: not for a token
    /// that has expired.
    pub fn renewable(&self) -> bool {
        self.id_token
            .as_ref()
            .is_none_or(|w| w.expires > SystemTime::now())
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
/// with a place for whoever serves them to keep what it made of them (the
/// surface keeps its rendered answers there, since they never change). The
/// cache does not know what that is.
pub struct Issued {
    credentials: Credentials,
    served: OnceLock<Box<dyn std::any::Any + Send + Sync>>,
}

impl Issued {
    pub fn new(credentials: Credentials) -> Self {
        Self {
            credentials,
            served: OnceLock::new(),
        }
    }

    /// What the server of these credentials keeps with them: made by
    /// `init` the first time a `T` is asked for. Only one type is kept;
    /// asking for another gives `None`.
    pub fn served<T: std::any::Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Option<&T> {
        self.served
            .get_or_init(|| Box::new(init()))
            .downcast_ref::<T>()
    }
}

/// What is kept with them may hold the secrets in the clear: never printed.
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
    #[error("{operation} {role_arn} failed: {message}")]
    AssumeRole {
        /// `AssumeRole` or `AssumeRoleWithWebIdentity`.
        operation: &'static str,
        role_arn: RoleArn,
        /// STS's error code (`AccessDenied`, ...), when it sent one.
        code: Option<String>,
        message: String,
    },
    #[error("STS returned no credentials for {0}")]
    Empty(RoleArn),
    #[error("STS has not answered within {0:?}; still trying")]
    Timeout(Duration),
    #[error("credential fetch failed: {0}")]
    Task(String),
    #[error("GetCallerIdentity failed: {0}")]
    CallerIdentity(String),
}

impl CredentialsError {
    /// An AccessDenied names what the role's trust policy is missing: for
    /// a job's ID token, the GitLab provider and conditions its claims
    /// meet; for a session with tags or SourceIdentity, those actions.
    fn with_hint(self, key: &CredKey) -> Self {
        let session = &key.session;
        let Self::AssumeRole {
            operation,
            role_arn,
            code,
            message,
        } = self
        else {
            return self;
        };
        let hint = if code.as_deref() != Some("AccessDenied") {
            None
        } else if key.id_token.is_some() {
            Some("the role's trust policy does not let this token assume it: it needs a statement for sts:AssumeRoleWithWebIdentity with the GitLab instance's OIDC provider as Federated principal, and conditions on aud and sub that this job's claims meet")
        } else if session.is_empty() {
            None
        } else if message.contains("sts:TagSession") {
            Some("the role's trust policy does not allow sts:TagSession for the instance role: allow it, or turn --session-tags off")
        } else if message.contains("sts:SetSourceIdentity") {
            Some("the role's trust policy does not allow sts:SetSourceIdentity for the instance role: allow it, or turn --source-identity off")
        } else {
            Some("session tags or SourceIdentity are on: the role's trust policy must allow sts:TagSession and sts:SetSourceIdentity as well as sts:AssumeRole")
        };
        Self::AssumeRole {
            operation,
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
        // Nor with what a server keeps with them.
        let issued = Issued::new(c);
        let kept = issued.served(|| issued.secret_access_key.expose().to_string());
        assert_eq!(kept.map(String::as_str), Some("very-secret"));
        let printed = format!("{issued:?}");
        assert!(printed.contains("ASIAEXAMPLE"));
        assert!(!printed.contains("very-secret"), "{printed}");
    }
}
