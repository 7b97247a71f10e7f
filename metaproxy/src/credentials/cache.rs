//! The credential cache: keys, their owners, single flight, failure
//! backoff, refresh ahead of expiry. It knows keys and owners, nothing of
//! containers, roles or answers.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use tokio::task::JoinSet;

use super::{
    CredKey, Credentials, CredentialsError, Issued, Sts, FAILURE_BACKOFF, FAILURE_BACKOFF_MAX,
    IDLE_EVICT, REFRESH_AHEAD, SERVE_MIN_REMAINING, STALE_MIN_REMAINING,
};
use crate::{
    model::ids::ContainerId,
    ops::metrics::{CacheMetrics, Lookup},
};

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
            self.metrics.lookup(Lookup::Hit);
            return Ok(c);
        }
        if let Some(e) = slot.recent_failure() {
            self.metrics.lookup(Lookup::Failing);
            return Err(e);
        }
        self.metrics.lookup(Lookup::Miss);
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
            .map_err(|e| e.with_hint(key));
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

    /// Fetches `key` for container `owner` in the background (a container
    /// that starts with a role), so its first request finds it cached.
    pub fn prefetch(self: &Arc<Self>, key: CredKey, owner: &ContainerId) {
        self.own(owner, &key);
        let this = self.clone();
        self.spawn(async move {
            if let Err(e) = this.fetch(&key).await {
                tracing::warn!(error = %e, "prefetch failed");
            }
        });
    }

    /// Drops the keys `owner` used, unless another owner still uses them
    /// (its container is gone).
    pub fn release(&self, owner: &ContainerId) {
        self.container_gone(owner);
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
            // A job's token that has expired buys nothing more from STS:
            // its entry goes rather than fail on every pass.
            slots.retain(|key, slot| slot.idle() < IDLE_EVICT && key.renewable());
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
    fn backoff_doubles_to_a_cap_with_jitter_below() {
        for (streak, base) in [(1, 1), (2, 2), (3, 4), (6, 30), (40, 30)] {
            let d = backoff(streak);
            let base = Duration::from_secs(base);
            assert!(d <= base && d >= base - base / 5, "{streak}: {d:?}");
        }
    }
}
