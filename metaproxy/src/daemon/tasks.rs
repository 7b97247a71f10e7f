//! The daemon's long-running tasks besides serving: one set that fails
//! the daemon if any of them ends, the policy file's reloads, account
//! discovery, credential prefetch, signals.

use super::*;
use crate::{
    credentials::CredKey, model::container::ContainerEvent, ops::logging::Clean,
    policy::RoleDecision,
};
use tokio::sync::broadcast;

/// Tasks by id, with the name they are logged under and whether they may
/// finish on their own.
#[derive(Default)]
pub(super) struct Tasks {
    pub(super) set: JoinSet<()>,
    names: HashMap<tokio::task::Id, (&'static str, bool)>,
}

impl Tasks {
    /// A task that runs as long as the daemon does.
    pub(super) fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let id = self.set.spawn(task).id();
        self.names.insert(id, (name, false));
    }

    /// A task that finishes once its work is done.
    pub(super) fn spawn_finite(
        &mut self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let id = self.set.spawn(task).id();
        self.names.insert(id, (name, true));
    }

    /// Waits for a task to end; `Err` if it should not have.
    pub(super) async fn next_failure(&mut self) -> anyhow::Error {
        loop {
            let Some(done) = self.set.join_next_with_id().await else {
                return anyhow::anyhow!("no tasks left");
            };
            let (id, panic) = match done {
                Ok((id, ())) => (id, None),
                Err(e) => (e.id(), Some(e.to_string())),
            };
            let (name, finite) = self.names.remove(&id).unwrap_or(("unknown", false));
            match panic {
                None if finite => tracing::debug!(task = name, "task done"),
                None => {
                    tracing::error!(task = name, "task ended unexpectedly");
                    return anyhow::anyhow!("the {name} task ended unexpectedly");
                }
                Some(e) => {
                    tracing::error!(task = name, error = %e, "task failed");
                    return anyhow::anyhow!("the {name} task failed: {e}");
                }
            }
        }
    }
}

/// How often the policy file is checked for changes.
pub(super) const POLICY_POLL: Duration = Duration::from_secs(2);

/// Reloads the policy file on SIGHUP and when its contents change. A file
/// that does not load is never applied: the policy in force stays, and the
/// error (with its line) is logged.
pub(super) async fn follow_policy_file(policy: Arc<Policy>, path: Option<PathBuf>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(hup) => hup,
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP");
            std::future::pending::<()>().await;
            return;
        }
    };
    let read = |p: &PathBuf| std::fs::read(p).ok();
    let mut seen = path.as_ref().and_then(read);
    loop {
        let signalled = tokio::select! {
            _ = hup.recv() => true,
            () = tokio::time::sleep(POLICY_POLL) => false,
        };
        let Some(path) = &path else {
            if signalled {
                tracing::info!("SIGHUP: no --policy-file to reload");
            }
            continue;
        };
        let now = read(path);
        if !signalled && now == seen {
            continue;
        }
        seen = now;
        if let Err(e) = config::check_policy_file(path) {
            tracing::error!(
                error = %e,
                "policy file not reloaded: the previous policy stays in force"
            );
            continue;
        }
        match PolicyFile::load(path) {
            Ok(file) => {
                tracing::info!(path = %path.display(), rules = file.rules(), "policy file reloaded");
                policy.set_file(Some(file));
            }
            Err(e) => tracing::error!(
                error = %e,
                "policy file not reloaded: the previous policy stays in force"
            ),
        }
    }
}

/// Learns the instance profile's account (role names are taken in it, and
/// by default only its roles are allowed), retrying while STS is down.
pub(super) async fn discover_account(
    sts: Arc<dyn Sts>,
    account: Arc<OnceLock<AccountId>>,
    me_out: Arc<OnceLock<CallerIdentity>>,
) {
    let mut delay = Duration::from_secs(1);
    loop {
        match sts.caller_identity().await {
            Ok(me) => {
                tracing::info!(account = %me.account, arn = %me.arn, "instance credentials work");
                let _ = account.set(me.account.clone());
                let _ = me_out.set(me);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach STS with the instance credentials; retrying");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

pub(super) async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Acts on identity's container events forever: prefetches credentials
/// for containers that start with a role (as `policy` decides), releases
/// them when their containers are gone. Run it as a task.
/// Forgets the answer pins of containers that are gone, so their
/// addresses are pinned afresh for whoever gets them next.
pub(super) async fn forget_answer_pins(
    answers: Arc<crate::kernel::wire::KernelAnswerPath>,
    mut events: broadcast::Receiver<ContainerEvent>,
) {
    loop {
        match events.recv().await {
            Ok(ContainerEvent::Gone(id)) => answers.forget(&id),
            Ok(ContainerEvent::Started(_)) => {}
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "container events: the answer pins fell behind; every pin will be made again"
                );
                answers.forget_all();
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

pub async fn prefetch_credentials(
    credentials: Arc<CredentialCache>,
    mut events: broadcast::Receiver<ContainerEvent>,
    policy: Arc<Policy>,
    identities: Arc<Identities>,
) {
    loop {
        match events.recv().await {
            Ok(ContainerEvent::Started(c)) => {
                if !crate::model::gitlab::asks_for_role(&c) {
                    continue;
                }
                // Verifying a token may wait on the issuer: never in the
                // loop that reads the events.
                let (credentials, policy, identities) =
                    (credentials.clone(), policy.clone(), identities.clone());
                tokio::spawn(async move {
                    let token = identities.job_token(&c).await;
                    let RoleDecision::Role(role) = policy.decide_for(&c, &token) else {
                        return;
                    };
                    let key = CredKey::from(&role);
                    tracing::info!(container_id = %c.id, container = %Clean(&c.name), role_arn = %key.role_arn, source = role.source(), "prefetching credentials");
                    credentials.prefetch(key, &c.id);
                });
            }
            Ok(ContainerEvent::Gone(id)) => credentials.release(&id),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "container events: fell behind");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
