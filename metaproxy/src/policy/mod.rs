//! What a caller may have: the role decision for a container, and the rules
//! for host processes.
//!
//! The runner chooses roles (IAM_ROLE in its `[[runners]] environment`);
//! image authors and job authors must not. There is no default role. Every
//! value read here was written by someone a job may control (env, labels):
//! it is checked, never trusted.

mod explain;
mod facts;
pub mod file;
mod globs;

use globs::glob_set;
mod host;

pub use host::{allow_listed, HostRefusal};

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock, RwLock, Weak,
    },
};

use globset::GlobSet;

use crate::{
    model::ids::{self, AccountId, ContainerId, RoleArn, RoleArnError},
    model::session::{Session, SessionOptions},
    model::{
        container::Container,
        gitlab::{self, single_value, Unclear},
        id_token::{IdToken, TokenRefusal, TokenState},
    },
    policy::file::{FactSource, Facts, FileRefusal, PolicyFile},
};

/// The container types that get roles unless configured otherwise.
pub const DEFAULT_CONTAINER_TYPES: [&str; 2] = ["build", "service"];

/// A role a container may assume, and the session it is assumed as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub arn: RoleArn,
    pub external_id: Option<String>,
    /// RoleSessionName: the job, else the container.
    pub session_name: String,
    /// Session tags and SourceIdentity from the job (when turned on).
    pub session: Session,
    /// The job's verified ID token: assumed with AssumeRoleWithWebIdentity,
    /// never with the instance profile.
    pub id_token: Option<Arc<IdToken>>,
}

impl Role {
    /// Where the credentials come from, as the audit line names it.
    pub fn source(&self) -> &'static str {
        match self.id_token {
            Some(_) => "web-identity",
            None => "assume-role",
        }
    }
}

/// The verdict for one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleDecision {
    /// No IAM_ROLE (or an empty one): the container gets no credentials.
    NoRole,
    Role(Role),
    /// A role was asked for and refused.
    Refused(RoleRefusal),
}

/// Why a container's role was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleRefusal {
    #[error("{0} is set more than once with different values")]
    Conflicting(&'static str),
    #[error("{0} comes from the image's ENV; only the runner may set it")]
    FromImage(&'static str),
    #[error("IAM_ROLE {value:?} is not a role ARN")]
    NotRoleArn { value: String },
    #[error("IAM_ROLE {value:?} is not a valid role name")]
    BadRoleName { value: String },
    #[error("the instance profile's account is not known yet")]
    AccountUnknown,
    /// Roles go only to containers gitlab-runner started for a job: a
    /// classic `docker build` step puts a job's `ARG IAM_ROLE=...` in its
    /// environment, and a container a job starts can carry any variable.
    #[error("not a gitlab-runner job container (no com.gitlab.gitlab-runner.job.id label of the runner's own): no role")]
    NotAJob,
    #[error("IAM_EXTERNAL_ID is not a valid external id (2-1224 of letters, digits and +=,.@:/-)")]
    BadExternalId,
    #[error("{arn} is not allowed by {rule}")]
    NotAllowed { arn: RoleArn, rule: &'static str },
    /// The policy file does not allow this role for this runner, project
    /// and ref.
    #[error(transparent)]
    PolicyFile(#[from] FileRefusal),
    /// A label only gitlab-runner may set came with the image: a
    /// container inherits its image's labels, so it proves nothing, and
    /// for the type label it would switch the type check off.
    #[error("the image carries gitlab-runner's {0} label; only the runner may set it")]
    ImageLabel(&'static str),
    /// gitlab-runner's helper (`predefined`) and other container types get
    /// no role unless `--role-container-types` lists them.
    #[error("a gitlab-runner {0:?} container (com.gitlab.gitlab-runner.type); roles go to the types in --role-container-types")]
    ContainerType(String),
    /// The job's ID token failed a check, or `--oidc-required` and it has
    /// none: no credentials, and no AssumeRole in its place.
    #[error(transparent)]
    IdToken(#[from] TokenRefusal),
}

impl From<Unclear> for RoleRefusal {
    fn from(u: Unclear) -> Self {
        match u {
            Unclear::Conflicting(key) => Self::Conflicting(key),
            Unclear::FromImage(key) => Self::FromImage(key),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{flag} {pattern:?}")]
pub struct PatternError {
    flag: &'static str,
    pattern: String,
    #[source]
    source: globset::Error,
}

/// The role policy: `--allow-role` globs, or the instance's own account;
/// and the host-process allow-list (`--allow-host-cgroup`), deny by default.
#[derive(Debug)]
pub struct Policy {
    allow: Option<GlobSet>,
    host_allow: Option<GlobSet>,
    /// The instance profile's account, once STS told us.
    account: Arc<OnceLock<AccountId>>,
    session: SessionOptions,
    /// Container types (gitlab-runner's type label) that may get roles.
    container_types: Vec<String>,
    /// The policy file in force, if any; swapped whole on reload.
    file: RwLock<Option<Arc<PolicyFile>>>,
    /// Bumped whenever the file in force changes.
    generation: AtomicU64,
    /// Decisions made, per container (see [`Policy::decision`]).
    decided: Mutex<Decided>,
    /// `--oidc-required`: the token variable a job container must carry a
    /// valid token in to get any role.
    token_required: Option<&'static str>,
}

/// Decisions already made, per container. Each holds while its container
/// is the one the identity cache holds (a container's config does not
/// change while it exists), the file in force is the same and the account
/// is as known as it was. Entries of containers the identity cache has
/// let go are pruned as the map grows, so it stays sized by live ones.
#[derive(Debug, Default)]
struct Decided {
    by_container: HashMap<ContainerId, Memo>,
    /// Prune dead entries when the map reaches this size.
    prune_at: usize,
}

#[derive(Debug)]
struct Memo {
    container: Weak<Container>,
    generation: u64,
    account_known: bool,
    /// The verified token decided on, if any (a decision about a token
    /// is made again for another token).
    token: Option<Arc<IdToken>>,
    decision: Arc<RoleDecision>,
}

/// The fewest entries before the first prune.
const DECIDED_PRUNE_MIN: usize = 64;

impl Policy {
    pub fn new(
        allow_role: &[String],
        allow_host_cgroup: &[String],
        account: Arc<OnceLock<AccountId>>,
    ) -> Result<Self, PatternError> {
        Ok(Self {
            allow: glob_set("--allow-role", allow_role)?,
            host_allow: glob_set("--allow-host-cgroup", allow_host_cgroup)?,
            account,
            session: SessionOptions::default(),
            container_types: DEFAULT_CONTAINER_TYPES.map(String::from).to_vec(),
            file: RwLock::new(None),
            generation: AtomicU64::new(0),
            decided: Mutex::new(Decided::default()),
            token_required: None,
        })
    }

    /// `--oidc-required`: job containers without a valid ID token in
    /// `variable` get no role at all.
    pub fn with_token_required(mut self, variable: &'static str) -> Self {
        self.token_required = Some(variable);
        self
    }

    /// Which gitlab-runner container types may get roles.
    pub fn with_container_types(mut self, types: Vec<String>) -> Self {
        self.container_types = types;
        self
    }

    /// Puts `file` in force (whole: the previous one until this call).
    pub fn set_file(&self, file: Option<PolicyFile>) {
        *self.file.write().unwrap_or_else(|e| e.into_inner()) = file.map(Arc::new);
        // After the swap: a decision made from the old file carries the
        // old generation, and is made again.
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The policy file in force.
    pub fn file(&self) -> Option<Arc<PolicyFile>> {
        self.file.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The runner's container type label, unless the image brought it
    /// (which [`Policy::decide`] refuses outright).
    fn container_type(c: &Container) -> Option<&str> {
        gitlab::runner_set(c, gitlab::TYPE_LABEL)
            .then(|| c.labels.get(gitlab::TYPE_LABEL).map(String::as_str))
            .flatten()
    }

    /// Sends session tags and SourceIdentity with each AssumeRole.
    pub fn with_session(mut self, session: SessionOptions) -> Self {
        self.session = session;
        self
    }

    /// [`Policy::decide_for`] for `c` and its token, made once per
    /// container, token and policy: every request of a job asks, and the
    /// answer only changes when the policy does. A refused token is
    /// decided each time (it may be an expired one).
    pub fn decision(&self, c: &Arc<Container>, token: &TokenState) -> Arc<RoleDecision> {
        let verified = match token {
            TokenState::Absent => None,
            TokenState::Verified(t) => Some(t),
            TokenState::Refused(_) => return Arc::new(self.decide_for(c, token)),
        };
        // Read before deciding: a file swapped meanwhile makes the entry
        // stale at once rather than wrongly fresh.
        let generation = self.generation.load(Ordering::Acquire);
        let account_known = self.account.get().is_some();
        let fresh = |m: &Memo| {
            m.container.as_ptr() == Arc::as_ptr(c)
                && m.generation == generation
                && m.account_known == account_known
                && match (&m.token, verified) {
                    (None, None) => true,
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                }
        };
        if let Some(m) = self.decided().by_container.get(&c.id).filter(|m| fresh(m)) {
            return m.decision.clone();
        }
        let decision = Arc::new(self.decide_for(c, token));
        let mut decided = self.decided();
        if decided.by_container.len() >= decided.prune_at {
            decided
                .by_container
                .retain(|_, m| m.container.strong_count() > 0);
            decided.prune_at = (2 * decided.by_container.len()).max(DECIDED_PRUNE_MIN);
        }
        decided.by_container.insert(
            c.id.clone(),
            Memo {
                container: Arc::downgrade(c),
                generation,
                account_known,
                token: verified.cloned(),
                decision: decision.clone(),
            },
        );
        decision
    }

    fn decided(&self) -> std::sync::MutexGuard<'_, Decided> {
        self.decided.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decisions held (live containers, and dead ones not yet pruned).
    #[cfg(test)]
    fn decisions_held(&self) -> usize {
        self.decided().by_container.len()
    }

    /// [`Policy::decide_for`] a container that has no ID token.
    #[cfg(test)]
    pub fn decide(&self, c: &Container) -> RoleDecision {
        self.decide_for(c, &TokenState::Absent)
    }

    /// Decides from the container's environment (`Config.Env`, which
    /// already includes the image's), the image's own environment, the
    /// instance profile's account (if known yet) and the job's ID token.
    /// With a verified token the role is assumed with it, and the policy
    /// file's facts are its claims; a refused token refuses the role.
    pub fn decide_for(&self, c: &Container, token: &TokenState) -> RoleDecision {
        let account = self.account.get();
        let role = match single_value(&c.env, &c.image_env, "IAM_ROLE") {
            Ok(None) => return RoleDecision::NoRole,
            Ok(Some(v)) => v,
            Err(refusal) => return RoleDecision::Refused(refusal.into()),
        };
        if !gitlab::runner_set(c, gitlab::JOB_LABEL) {
            return RoleDecision::Refused(RoleRefusal::NotAJob);
        }
        // Without the runner's own type label the type check cannot run:
        // an image must not be able to take the label away.
        if c.image_labels.contains_key(gitlab::TYPE_LABEL) {
            return RoleDecision::Refused(RoleRefusal::ImageLabel(gitlab::TYPE_LABEL));
        }
        if let Some(kind) = Self::container_type(c) {
            if !self.container_types.iter().any(|t| t == kind) {
                return RoleDecision::Refused(RoleRefusal::ContainerType(kind.to_string()));
            }
        }
        let token = match token {
            TokenState::Refused(refusal) => {
                return RoleDecision::Refused(RoleRefusal::IdToken(refusal.clone()))
            }
            TokenState::Absent => match self.token_required {
                Some(variable) => {
                    return RoleDecision::Refused(TokenRefusal::Required(variable).into())
                }
                None => None,
            },
            TokenState::Verified(token) => Some(token),
        };
        let external_id = match single_value(&c.env, &c.image_env, "IAM_EXTERNAL_ID") {
            Ok(Some(v)) if !ids::valid_external_id(v) => {
                return RoleDecision::Refused(RoleRefusal::BadExternalId)
            }
            Ok(v) => v.map(str::to_owned),
            Err(refusal) => return RoleDecision::Refused(refusal.into()),
        };
        let arn = if role.starts_with("arn:") {
            RoleArn::parse(role).map_err(|_| RoleRefusal::NotRoleArn {
                value: role.to_string(),
            })
        } else {
            match account {
                Some(account) => RoleArn::from_name(role, account).map_err(|e| match e {
                    RoleArnError::NotRoleArn(_)
                    | RoleArnError::BadName(_)
                    | RoleArnError::BadPath(_) => RoleRefusal::BadRoleName {
                        value: role.to_string(),
                    },
                }),
                None if valid_role_name(role) => Err(RoleRefusal::AccountUnknown),
                None => Err(RoleRefusal::BadRoleName {
                    value: role.to_string(),
                }),
            }
        };
        let arn = match arn {
            Ok(arn) => arn,
            Err(refusal) => return RoleDecision::Refused(refusal),
        };
        if let Err(refusal) = self.admits(&arn) {
            return RoleDecision::Refused(refusal);
        }
        if let Some(file) = self.file() {
            if let Err(refusal) = file.check(&arn, &Facts::for_container(c, token.map(|t| &**t))) {
                return RoleDecision::Refused(refusal.into());
            }
        }
        match token {
            // AssumeRoleWithWebIdentity takes no external id, tags or
            // SourceIdentity: the trust policy's conditions on the claims
            // stand in for them.
            Some(token) => RoleDecision::Role(Role {
                arn,
                external_id: None,
                session_name: gitlab::clean_session_name(&gitlab::job_session_name(
                    &token.claims.job_id,
                )),
                session: Session::default(),
                id_token: Some(token.clone()),
            }),
            None => RoleDecision::Role(Role {
                arn,
                external_id,
                session_name: gitlab::session_name(c),
                session: Session::for_container(c, &self.session),
                id_token: None,
            }),
        }
    }

    /// Whether `--allow-role` (or, without it, the instance profile's
    /// account) admits `arn` at all.
    pub fn admits(&self, arn: &RoleArn) -> Result<(), RoleRefusal> {
        let allowed = match (&self.allow, self.account.get()) {
            (Some(set), _) => set.is_match(arn.as_str()),
            (None, Some(account)) => arn.account() == account,
            (None, None) => false,
        };
        if allowed {
            return Ok(());
        }
        let rule = if self.allow.is_some() {
            "--allow-role"
        } else {
            "the instance profile's account"
        };
        Err(RoleRefusal::NotAllowed {
            arn: arn.clone(),
            rule,
        })
    }

    /// Whether a container with no role looks like a build container of
    /// gitlab-runner's native steps mode, which keeps the runner's
    /// `environment` (and so IAM_ROLE) out of the container.
    pub fn native_steps(c: &Container) -> bool {
        Self::container_type(c) == Some("build")
            && !c.env.iter().any(|e| e.starts_with("CI_JOB_ID="))
    }
}

fn valid_role_name(name: &str) -> bool {
    let leaf = name.rsplit('/').next().unwrap_or("");
    (1..=64).contains(&leaf.len())
        && name.len() <= 512
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-/".contains(c))
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod token_tests;
