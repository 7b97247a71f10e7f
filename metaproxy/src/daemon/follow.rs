//! What keeps the request path current while the daemon runs: the policy
//! file's reloads, the instance profile's account, credentials prefetched
//! and released as containers come and go, answer pins forgotten with
//! their containers.

use std::{
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use tokio::sync::broadcast;

use crate::{
    config,
    credentials::{CallerIdentity, CredKey, CredentialCache, Sts},
    identity::Identities,
    kernel::wire::KernelAnswerPath,
    model::{container::ContainerEvent, ids::AccountId},
    ops::logging::Clean,
    policy::{file::PolicyFile, Policy, RoleDecision},
};

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

/// Forgets the answer pins of containers that are gone, so their
/// addresses are pinned afresh for whoever gets them next.
pub(super) async fn forget_answer_pins(
    answers: Arc<KernelAnswerPath>,
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

/// Acts on identity's container events forever: prefetches credentials
/// for containers that start with a role (as `policy` decides), releases
/// them when their containers are gone. Run it as a task.
pub(super) async fn prefetch_credentials(
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
                    let token = identities.id_token(&c).await;
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
