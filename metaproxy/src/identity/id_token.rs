//! A job's GitLab ID token, verified: the variable the runner's job carries
//! (`AWS_ID_TOKEN` unless `--oidc-token-variable` says otherwise) -> its
//! signature against the issuer's JWKS -> `iss`, `aud`, `exp`, `nbf`,
//! `iat` -> its `job_id` against the container's own job label.
//!
//! Nothing reads a claim before all of that holds, and a token that fails
//! any check is a refusal, never "no token": a container that presents a
//! bad token gets nothing, not the instance profile's AssumeRole. (An empty
//! variable is no token, as an empty `IAM_ROLE` is no role: it gains a job
//! nothing it would not have without `id_tokens:`.)
//!
//! The issuer's keys come from its discovery document
//! (`/.well-known/openid-configuration` -> `jwks_uri`). They are fetched
//! at start, refreshed every [`JWKS_REFRESH`], and fetched again when a
//! token names a key the set lacks, at most once per [`REFETCH_MIN`]
//! (a job cannot make the daemon hammer GitLab by inventing key ids). A
//! fetch that fails keeps the keys already known, so a brief GitLab outage
//! stops nothing.
//!
//! A job can abuse what it controls: its own variables (a second
//! `AWS_ID_TOKEN`: refused as conflicting), the image's `ENV` (refused), a
//! token of another job or another GitLab (refused by `job_id` and `iss`),
//! a token it made itself (no key in the JWKS signs it), `alg: none` or
//! HS256 with the public key as secret (only asymmetric algorithms are
//! taken, and only the one the key is for).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant, SystemTime},
};

use futures_util::future::BoxFuture;
use jsonwebtoken::{
    errors::ErrorKind,
    jwk::{JwkSet, PublicKeyUse},
    Algorithm, DecodingKey, Validation,
};
use sha2::{Digest as _, Sha256};

use crate::model::{
    container::Container,
    gitlab::{self, single_value, Unclear},
    id_token::{shorten, Claims, IdToken, TokenRefusal, TokenState},
    secret::Secret,
};

pub mod discovery;

pub use discovery::{Discovery, IssuerUrlError};

/// Clock skew allowed on `exp`, `nbf` and `iat`.
pub const LEEWAY: Duration = Duration::from_secs(30);
/// A token naming a key we do not have fetches the JWKS again, at most this
/// often.
pub const REFETCH_MIN: Duration = Duration::from_secs(5);
/// The keys are fetched again this often, so a key GitLab dropped stops
/// verifying.
pub const JWKS_REFRESH: Duration = Duration::from_secs(15 * 60);
/// Verified tokens kept (by digest); past it the memo starts afresh.
const MAX_VERIFIED: usize = 4096;

/// The algorithms GitLab may sign with: asymmetric only.
const ALGORITHMS: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// Where the issuer's keys come from: its discovery document over HTTP in
/// the daemon, a table in tests.
pub trait KeySource: Send + Sync + 'static {
    fn fetch(&self) -> BoxFuture<'_, Result<JwkSet, String>>;
}

/// What to accept.
#[derive(Debug, Clone)]
pub struct TokenRules {
    /// `iss`, as the issuer writes it (no trailing slash).
    pub issuer: String,
    pub audience: String,
    /// The job variable that holds the token.
    pub variable: &'static str,
}

#[derive(Debug)]
struct Keys {
    set: JwkSet,
}

/// Verifies jobs' ID tokens. Share it as `Arc`.
pub struct IdTokens {
    rules: TokenRules,
    source: Arc<dyn KeySource>,
    keys: RwLock<Option<Arc<Keys>>>,
    /// When the keys were last asked for; held while asking (one fetch at
    /// a time).
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    /// Tokens whose signature and claims verified, by digest: each request
    /// of a job presents the same token. Cleared whenever the keys change.
    verified: Mutex<HashMap<[u8; 32], Arc<IdToken>>>,
    /// Bumped whenever the keys change: a token verified against older
    /// keys is not remembered.
    generation: AtomicU64,
    fetched: AtomicBool,
}

impl std::fmt::Debug for IdTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdTokens")
            .field("rules", &self.rules)
            .field("keys_fetched", &self.ready())
            .finish_non_exhaustive()
    }
}

impl IdTokens {
    pub fn new(rules: TokenRules, source: Arc<dyn KeySource>) -> Self {
        Self {
            rules,
            source,
            keys: RwLock::new(None),
            last_fetch: tokio::sync::Mutex::new(None),
            verified: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            fetched: AtomicBool::new(false),
        }
    }

    pub fn rules(&self) -> &TokenRules {
        &self.rules
    }

    /// Whether the issuer's keys have been fetched at least once.
    pub fn ready(&self) -> bool {
        self.fetched.load(Ordering::Relaxed)
    }

    /// What the token of container `c` comes to, now.
    pub async fn check(&self, c: &Container) -> TokenState {
        let raw = match single_value(&c.env, &c.image_env, self.rules.variable) {
            Ok(None) => return TokenState::Absent,
            Ok(Some(raw)) => raw,
            Err(Unclear::Conflicting(v)) => {
                return TokenState::Refused(TokenRefusal::Conflicting(v))
            }
            Err(Unclear::FromImage(v)) => return TokenState::Refused(TokenRefusal::FromImage(v)),
        };
        match self.verify(raw, SystemTime::now()).await {
            Ok(token) => match bound_to(&token, c) {
                Ok(()) => TokenState::Verified(token),
                Err(refusal) => TokenState::Refused(refusal),
            },
            Err(refusal) => TokenState::Refused(refusal),
        }
    }

    /// The token `raw`, verified as of `now`.
    pub async fn verify(&self, raw: &str, now: SystemTime) -> Result<Arc<IdToken>, TokenRefusal> {
        let digest: [u8; 32] = Sha256::digest(raw.as_bytes()).into();
        let known = self.memo().get(&digest).cloned();
        let token = match known {
            Some(token) => token,
            None => {
                let generation = self.generation.load(Ordering::Acquire);
                let token = Arc::new(self.verify_signed(raw, now).await?);
                let mut memo = self.memo();
                // Keys that changed meanwhile may have dropped the one it
                // verified with: verify again next time.
                if self.generation.load(Ordering::Acquire) == generation {
                    if memo.len() >= MAX_VERIFIED {
                        memo.clear();
                    }
                    memo.insert(digest, token.clone());
                }
                token
            }
        };
        // Time moves on for a token verified before.
        check_times(&token.claims, now)?;
        Ok(token)
    }

    fn memo(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Arc<IdToken>>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn verify_signed(&self, raw: &str, now: SystemTime) -> Result<IdToken, TokenRefusal> {
        let malformed = |why: String| TokenRefusal::Malformed {
            variable: self.rules.variable,
            why,
        };
        let header = jsonwebtoken::decode_header(raw).map_err(|e| malformed(e.to_string()))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(TokenRefusal::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.ok_or(TokenRefusal::NoKeyId)?;
        let key = self.key(&kid, header.alg).await?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.rules.issuer]);
        validation.set_audience(&[&self.rules.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY.as_secs();
        let kid_short = shorten(&kid, 64);
        let data = jsonwebtoken::decode::<Claims>(raw, &key, &validation).map_err(|e| {
            // The signature verified unless the error says otherwise, so
            // what the claims say may be quoted.
            let claims =
                || jsonwebtoken::dangerous::insecure_decode_claims::<serde_json::Value>(raw).ok();
            let time = |name: &str| {
                claims()
                    .and_then(|c| c.get(name).and_then(serde_json::Value::as_u64))
                    .map_or_else(|| "?".into(), unix_time)
            };
            match e.kind() {
                ErrorKind::InvalidSignature
                | ErrorKind::InvalidAlgorithm
                | ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidKeyFormat => TokenRefusal::Signature { kid: kid_short },
                ErrorKind::ExpiredSignature => TokenRefusal::Expired { at: time("exp") },
                ErrorKind::ImmatureSignature => TokenRefusal::NotYetValid { at: time("nbf") },
                ErrorKind::InvalidIssuer => TokenRefusal::Issuer {
                    found: claims()
                        .and_then(|c| c.get("iss").and_then(|i| i.as_str()).map(str::to_owned))
                        .map_or_else(|| "?".into(), |i: String| shorten(&i, 100)),
                    expected: self.rules.issuer.clone(),
                },
                ErrorKind::InvalidAudience => TokenRefusal::Audience {
                    expected: self.rules.audience.clone(),
                },
                ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
                    malformed(e.to_string())
                }
                _ => TokenRefusal::Claims(shorten(&e.to_string(), 200)),
            }
        })?;
        check_times(&data.claims, now)?;
        Ok(IdToken {
            raw: Secret::new(raw.to_string()),
            claims: data.claims,
        })
    }

    /// The key `kid`, for `alg`; fetches the JWKS again if we lack it.
    async fn key(&self, kid: &str, alg: Algorithm) -> Result<DecodingKey, TokenRefusal> {
        let found = match self.find(kid, alg) {
            Some(found) => found,
            None => {
                self.refetch().await?;
                self.find(kid, alg)
                    .ok_or_else(|| TokenRefusal::UnknownKey {
                        kid: shorten(kid, 64),
                    })?
            }
        };
        found.map_err(|_| TokenRefusal::Signature {
            kid: shorten(kid, 64),
        })
    }

    /// The key `kid` of the set in hand, if the set has it for `alg`.
    fn find(&self, kid: &str, alg: Algorithm) -> Option<Result<DecodingKey, ()>> {
        let keys = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        let jwk = keys.set.keys.iter().find(|k| {
            k.common.key_id.as_deref() == Some(kid)
                && !matches!(
                    k.common.public_key_use,
                    Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
                )
        })?;
        // A key published for one algorithm verifies that one only.
        if let Some(published) = jwk.common.key_algorithm {
            if published.to_string() != format!("{alg:?}") {
                return Some(Err(()));
            }
        }
        Some(DecodingKey::from_jwk(jwk).map_err(|_| ()))
    }

    /// Fetches the keys again unless that was done less than
    /// [`REFETCH_MIN`] ago. An error only if no keys are known at all.
    async fn refetch(&self) -> Result<(), TokenRefusal> {
        match self.fetch(REFETCH_MIN).await {
            Err(e) if !self.ready() => Err(TokenRefusal::IssuerUnavailable(shorten(&e, 200))),
            _ => Ok(()),
        }
    }

    /// Fetches and installs the keys, unless they were asked for less than
    /// `min_gap` ago. One fetch at a time; a failure keeps the keys known.
    async fn fetch(&self, min_gap: Duration) -> Result<(), String> {
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|t| t.elapsed() < min_gap) {
            return Ok(());
        }
        *last = Some(Instant::now());
        match self.source.fetch().await {
            Ok(set) => {
                self.install(set);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, issuer = %self.rules.issuer, "cannot fetch the issuer's keys; keeping those known");
                Err(e)
            }
        }
    }

    fn install(&self, set: JwkSet) {
        let ids: Vec<String> = set
            .keys
            .iter()
            .filter_map(|k| k.common.key_id.clone())
            .collect();
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        let changed = keys.as_ref().is_none_or(|k| k.set != set);
        if changed {
            tracing::info!(issuer = %self.rules.issuer, keys = ?ids, "issuer keys fetched");
            *keys = Some(Arc::new(Keys { set }));
            drop(keys);
            // A token verified with a key that is gone must verify again.
            let mut memo = self.memo();
            self.generation.fetch_add(1, Ordering::AcqRel);
            memo.clear();
        }
        self.fetched.store(true, Ordering::Relaxed);
    }

    /// Fetches the keys now and every [`JWKS_REFRESH`], retrying sooner
    /// (1 s doubling to 30 s) after a failure, forever. Run it as a task.
    pub async fn follow_keys(self: Arc<Self>) {
        let mut retry = Duration::from_secs(1);
        loop {
            let wait = match self.fetch(Duration::ZERO).await {
                Ok(()) => {
                    retry = Duration::from_secs(1);
                    JWKS_REFRESH
                }
                Err(_) => {
                    let wait = retry;
                    retry = (retry * 2).min(Duration::from_secs(30));
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// `nbf`, `iat` and `exp` as of `now`, with [`LEEWAY`].
fn check_times(c: &Claims, now: SystemTime) -> Result<(), TokenRefusal> {
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let leeway = LEEWAY.as_secs();
    if c.exp.saturating_add(leeway) <= now {
        return Err(TokenRefusal::Expired {
            at: unix_time(c.exp),
        });
    }
    if c.nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
        return Err(TokenRefusal::NotYetValid {
            at: unix_time(c.nbf.unwrap_or_default()),
        });
    }
    if c.iat > now.saturating_add(leeway) {
        return Err(TokenRefusal::IssuedInFuture {
            at: unix_time(c.iat),
        });
    }
    Ok(())
}

/// A token is served only to its own job's containers: its `job_id` must be
/// the job label the runner (not the image) put on the container.
fn bound_to(token: &IdToken, c: &Container) -> Result<(), TokenRefusal> {
    if !gitlab::runner_set(c, gitlab::JOB_LABEL) {
        return Err(TokenRefusal::NoJobLabel);
    }
    let label = c.job_id().unwrap_or_default();
    if label != token.claims.job_id {
        return Err(TokenRefusal::OtherJob {
            claim: shorten(&token.claims.job_id, 32),
            label: label.to_string(),
        });
    }
    Ok(())
}

fn unix_time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        .to_string()
}

#[cfg(test)]
mod tests;
