//! Role credentials from STS: AssumeRole with the instance profile's own
//! short-lived credentials, cached per (role ARN, external id, session name),
//! prefetched when a container starts, refreshed well before expiry, one STS
//! call however many requests wait for it, and still-valid credentials kept
//! while STS is failing.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant, SystemTime},
};

use aws_sdk_sts::Client as StsClient;

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
/// Role chaining (the instance profile's session assuming a role) caps
/// DurationSeconds at one hour.
const DURATION_SECONDS: i32 = 3600;

/// What to assume. Two containers share credentials only if all three agree.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CredKey {
    pub role_arn: String,
    pub external_id: Option<String>,
    pub session_name: String,
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

impl Credentials {
    pub fn remaining(&self) -> Duration {
        self.expiration
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("AssumeRole {role_arn} failed: {message}")]
    AssumeRole { role_arn: String, message: String },
    #[error("AssumeRole {0} returned no credentials")]
    Empty(String),
}

#[derive(Debug)]
struct Slot {
    value: RwLock<Option<Credentials>>,
    /// Held while calling STS: the single flight.
    fetching: tokio::sync::Mutex<()>,
    last_used: Mutex<Instant>,
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            value: RwLock::default(),
            fetching: tokio::sync::Mutex::default(),
            last_used: Mutex::new(Instant::now()),
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
}

/// The credential cache. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct CredentialCache {
    sts: StsClient,
    slots: Mutex<HashMap<CredKey, Arc<Slot>>>,
}

impl CredentialCache {
    pub fn new(sts: StsClient) -> Self {
        Self {
            sts,
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, key: &CredKey) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(key.clone()).or_default().clone()
    }

    /// Cached credentials for `key` that are fresh enough to serve.
    pub fn cached(&self, key: &CredKey) -> Option<Credentials> {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()?;
        slot.touch();
        fresh(&slot, SERVE_MIN_REMAINING)
    }

    /// Credentials for `key` with at least [`SERVE_MIN_REMAINING`] left,
    /// from the cache when possible. Concurrent callers share one STS call.
    pub async fn get(&self, key: &CredKey) -> Result<Credentials, CredentialsError> {
        let slot = self.slot(key);
        slot.touch();
        if let Some(c) = fresh(&slot, SERVE_MIN_REMAINING) {
            return Ok(c);
        }
        let _flight = slot.fetching.lock().await;
        // Whoever held the flight before us may have just fetched.
        if let Some(c) = fresh(&slot, SERVE_MIN_REMAINING) {
            return Ok(c);
        }
        self.fetch_into(key, &slot).await
    }

    async fn fetch_into(
        &self,
        key: &CredKey,
        slot: &Slot,
    ) -> Result<Credentials, CredentialsError> {
        match self.assume(key).await {
            Ok(c) => {
                tracing::info!(
                    role_arn = %key.role_arn,
                    assumed_role_arn = %c.assumed_role_arn,
                    session = %key.session_name,
                    access_key_id = %c.access_key_id,
                    expiration = %humantime::format_rfc3339_seconds(c.expiration),
                    "assumed role"
                );
                *slot.value.write().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
                Ok(c)
            }
            Err(e) => match fresh(slot, STALE_MIN_REMAINING) {
                Some(c) => {
                    tracing::warn!(error = %e, remaining_s = c.remaining().as_secs(), "sts failing; serving cached credentials");
                    Ok(c)
                }
                None => Err(e),
            },
        }
    }

    async fn assume(&self, key: &CredKey) -> Result<Credentials, CredentialsError> {
        let out = self
            .sts
            .assume_role()
            .role_arn(&key.role_arn)
            .role_session_name(&key.session_name)
            .duration_seconds(DURATION_SECONDS)
            .set_external_id(key.external_id.clone())
            .send()
            .await
            .map_err(|e| CredentialsError::AssumeRole {
                role_arn: key.role_arn.clone(),
                message: aws_sdk_sts::error::DisplayErrorContext(e).to_string(),
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

    /// Fetches `key` in the background (a container with a role started).
    pub fn prefetch(self: &Arc<Self>, key: CredKey) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.get(&key).await {
                tracing::warn!(error = %e, "prefetch failed");
            }
        });
    }

    /// Drops `key` (its container is gone).
    pub fn forget(&self, key: &CredKey) {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Renews, forever, every cached entry with less than [`REFRESH_AHEAD`]
    /// left, so requests never wait on STS. Run it as a task.
    pub async fn refresh_ahead(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let due: Vec<(CredKey, Arc<Slot>)> = {
                let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
                slots.retain(|_, slot| slot.idle() < IDLE_EVICT);
                slots
                    .iter()
                    .filter(|(_, slot)| fresh(slot, REFRESH_AHEAD).is_none())
                    .map(|(k, s)| (k.clone(), s.clone()))
                    .collect()
            };
            for (key, slot) in due {
                let _flight = slot.fetching.lock().await;
                if fresh(&slot, REFRESH_AHEAD).is_none() {
                    let _ = self.fetch_into(&key, &slot).await;
                }
            }
        }
    }
}

fn fresh(slot: &Slot, min_remaining: Duration) -> Option<Credentials> {
    let value = slot.value.read().unwrap_or_else(|e| e.into_inner());
    value
        .as_ref()
        .filter(|c| c.remaining() >= min_remaining)
        .cloned()
}

/// Cleans a session name to STS's rules: 2-64 characters of `[\w+=,.@-]`.
pub fn clean_session_name(raw: &str) -> String {
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    while name.len() < 2 {
        name.push('-');
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_follow_sts_rules() {
        assert_eq!(clean_session_name("gitlab-job-12345"), "gitlab-job-12345");
        assert_eq!(clean_session_name("job 7/deploy:prod"), "job-7-deploy-prod");
        assert_eq!(clean_session_name("a"), "a-");
        assert_eq!(clean_session_name(""), "--");
        assert_eq!(clean_session_name("ü"), "--");
        let long = clean_session_name(&"x".repeat(100));
        assert_eq!(long.len(), 64);
        assert_eq!(clean_session_name("a+b=c,d.e@f_g"), "a+b=c,d.e@f_g");
    }

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
    }
}
