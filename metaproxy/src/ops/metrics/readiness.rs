//! `/readyz`: what the daemon needs before it can serve, each checked
//! when asked.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc, OnceLock,
};

use crate::model::ids::AccountId;

/// Whether the whole request path works; each step is set as it comes up.
#[derive(Default)]
pub struct Readiness {
    attached: AtomicBool,
    guarded: OnceLock<Arc<dyn Fn() -> bool + Send + Sync>>,
    listening: AtomicBool,
    runtimes: OnceLock<Arc<dyn Fn() -> Result<(), &'static str> + Send + Sync>>,
    account: OnceLock<Arc<OnceLock<AccountId>>>,
    issuer_keys: OnceLock<Arc<dyn Fn() -> bool + Send + Sync>>,
    /// A protection this host cannot have: ready all the same, and said.
    gap: OnceLock<String>,
    /// Set by the probe's watchdog when something it must put back could
    /// not be.
    probe_broken: AtomicBool,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("ready", &self.check())
            .finish()
    }
}

impl Readiness {
    pub fn probe_attached(&self) {
        self.attached.store(true, Ordering::Relaxed);
    }

    /// The probe's watchdog: whether every link is attached and pinned.
    pub fn probe_intact(&self, intact: bool) {
        self.probe_broken.store(!intact, Ordering::Relaxed);
    }

    pub fn listening(&self) {
        self.listening.store(true, Ordering::Relaxed);
    }

    /// How to tell whether the packet guard is on every interface that
    /// routes to a guarded address.
    pub fn guard(&self, in_place: Arc<dyn Fn() -> bool + Send + Sync>) {
        let _ = self.guarded.set(in_place);
    }

    /// How to tell whether every container runtime's API is reachable,
    /// and which is not.
    pub fn runtimes(&self, reachable: Arc<dyn Fn() -> Result<(), &'static str> + Send + Sync>) {
        let _ = self.runtimes.set(reachable);
    }

    /// How to tell whether the GitLab issuer's keys have been fetched
    /// (`--oidc-issuer`).
    pub fn id_tokens(&self, fetched: Arc<dyn Fn() -> bool + Send + Sync>) {
        let _ = self.issuer_keys.set(fetched);
    }

    /// The daemon's own account, set once its credentials have worked.
    pub fn own_credentials(&self, account: Arc<OnceLock<AccountId>>) {
        let _ = self.account.set(account);
    }

    /// Records a protection this host cannot have (the BPF LSM missing):
    /// `/readyz` stays ready, and its detail says so.
    pub fn gap(&self, what: String) {
        let _ = self.gap.set(what);
    }

    /// The protection this host cannot have, if any.
    pub fn gap_detail(&self) -> Option<&str> {
        self.gap.get().map(String::as_str)
    }

    /// `Ok` when ready; otherwise the first thing missing, in start order.
    pub fn check(&self) -> Result<(), &'static str> {
        if !self.attached.load(Ordering::Relaxed) {
            return Err("the probe is not attached yet");
        }
        if self.probe_broken.load(Ordering::Relaxed) {
            return Err(
                "a pin or link of the probe is missing and could not be put back (see the log)",
            );
        }
        if !self.guarded.get().is_some_and(|on| on()) {
            return Err(
                "the packet guard is not on every host interface (those that route to IMDS first)",
            );
        }
        if !self.listening.load(Ordering::Relaxed) {
            return Err("the IMDS listener is not bound yet");
        }
        match self.runtimes.get() {
            Some(up) => up()?,
            None => return Err("no container runtime is followed yet"),
        }
        if self.issuer_keys.get().is_some_and(|fetched| !fetched()) {
            return Err(
                "the GitLab issuer's keys (JWKS) have not been fetched yet (--oidc-issuer)",
            );
        }
        if self.account.get().is_some_and(|a| a.get().is_none()) {
            return Err("the daemon's own AWS credentials have not worked yet (GetCallerIdentity)");
        }
        Ok(())
    }
}
