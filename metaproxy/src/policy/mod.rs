//! What a caller may have: the role decision for a container, and the rules
//! for host processes.
//!
//! The runner chooses roles (IAM_ROLE in its `[[runners]] environment`);
//! image authors and job authors must not. There is no default role. Every
//! value read here was written by someone a job may control (env, labels):
//! it is checked, never trusted.

pub mod file;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock, RwLock, Weak,
    },
};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::{
    attribution::Caller,
    model::ids::{AccountId, ContainerId, RoleArn, RoleArnError},
    model::session::{Session, SessionOptions},
    model::{
        container::Container,
        gitlab::{self, single_value, Unclear},
    },
    policy::file::{Facts, FileRefusal, PolicyFile},
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
}

impl From<Unclear> for RoleRefusal {
    fn from(u: Unclear) -> Self {
        match u {
            Unclear::Conflicting(key) => Self::Conflicting(key),
            Unclear::FromImage(key) => Self::FromImage(key),
        }
    }
}

/// Why a host process gets no pass-through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostRefusal {
    /// dockerd fetches URLs for its API clients (`docker build` with `ADD
    /// http://169.254.169.254/...`), and jobs are API clients.
    #[error("{0} acts for containers; it gets no pass-through")]
    ContainerRuntime(String),
    /// BuildKit runs `docker build` RUN steps in cgroups of its own, with no
    /// container behind them: job code, with the host's identity.
    #[error("BuildKit build step in {0}: no pass-through")]
    BuildStep(String),
    #[error("cgroup {0} is not in --allow-host-cgroup")]
    NotAllowListed(String),
    #[error("cgroup of the caller is unknown (gone before it could be read)")]
    UnknownCgroup,
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
        })
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
        c.labels
            .get(gitlab::TYPE_LABEL)
            .filter(|_| !c.image_labels.contains_key(gitlab::TYPE_LABEL))
            .map(String::as_str)
    }

    /// Sends session tags and SourceIdentity with each AssumeRole.
    pub fn with_session(mut self, session: SessionOptions) -> Self {
        self.session = session;
        self
    }

    /// [`Policy::decide`] for `c`, made once per container and policy: every
    /// request of a job asks, and the answer only changes when the policy
    /// does.
    pub fn decision(&self, c: &Arc<Container>) -> Arc<RoleDecision> {
        // Read before deciding: a file swapped meanwhile makes the entry
        // stale at once rather than wrongly fresh.
        let generation = self.generation.load(Ordering::Acquire);
        let account_known = self.account.get().is_some();
        let fresh = |m: &Memo| {
            m.container.as_ptr() == Arc::as_ptr(c)
                && m.generation == generation
                && m.account_known == account_known
        };
        if let Some(m) = self.decided().by_container.get(&c.id).filter(|m| fresh(m)) {
            return m.decision.clone();
        }
        let decision = Arc::new(self.decide(c));
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

    /// Decides from the container's environment (`Config.Env`, which
    /// already includes the image's), the image's own environment, and the
    /// instance profile's account (if known yet).
    pub fn decide(&self, c: &Container) -> RoleDecision {
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
        let external_id = match single_value(&c.env, &c.image_env, "IAM_EXTERNAL_ID") {
            Ok(Some(v)) if !valid_external_id(v) => {
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
        let allowed = match (&self.allow, account) {
            (Some(set), _) => set.is_match(arn.as_str()),
            (None, Some(account)) => arn.account() == account,
            (None, None) => false,
        };
        if !allowed {
            let rule = if self.allow.is_some() {
                "--allow-role"
            } else {
                "the instance profile's account"
            };
            return RoleDecision::Refused(RoleRefusal::NotAllowed { arn, rule });
        }
        if let Some(file) = self.file() {
            if let Err(refusal) = file.check(&arn, &Facts::of(c)) {
                return RoleDecision::Refused(refusal.into());
            }
        }
        RoleDecision::Role(Role {
            arn,
            external_id,
            session_name: gitlab::session_name(c),
            session: Session::for_container(c, &self.session),
        })
    }

    /// The decision for `c` and, with a policy file in force, each rule's
    /// verdict: what `metaproxy policy explain` prints.
    pub fn explain(&self, c: &Container) -> String {
        use std::fmt::Write as _;
        let decision = self.decide(c);
        let mut out = format!(
            "container {} ({})\n",
            crate::ops::logging::Clean(&c.name),
            c.id
        );
        let arn = match &decision {
            RoleDecision::Role(r) => {
                let _ = writeln!(out, "decision: role {} (session {})", r.arn, r.session_name);
                Some(r.arn.clone())
            }
            RoleDecision::NoRole if Self::native_steps(c) => {
                let _ = writeln!(out, "decision: no role (a build container without CI_ variables: gitlab-runner's native steps mode keeps IAM_ROLE out)");
                None
            }
            RoleDecision::NoRole => {
                let _ = writeln!(out, "decision: no role (no IAM_ROLE from the runner)");
                None
            }
            RoleDecision::Refused(why) => {
                let _ = writeln!(
                    out,
                    "decision: refused: {}",
                    crate::ops::logging::Clean(&why.to_string())
                );
                match why {
                    RoleRefusal::PolicyFile(refusal) => Some(refusal.arn().clone()),
                    _ => None,
                }
            }
        };
        let facts = Facts::of(c);
        let _ = writeln!(
            out,
            "facts: {}",
            crate::ops::logging::Clean(&facts.to_string())
        );
        match (self.file(), arn) {
            (None, _) => {
                let _ = writeln!(
                    out,
                    "policy file: none (--allow-role, or the instance's account, decides)"
                );
            }
            (Some(file), arn) => {
                let _ = writeln!(
                    out,
                    "policy file: {} ({} rules, {} runners)",
                    file.path(),
                    file.rules(),
                    file.runners()
                );
                match arn {
                    // Line by line: the verdicts quote the container's
                    // facts, which its job wrote.
                    Some(arn) => {
                        for line in file.explain(&arn, &facts).lines() {
                            let _ = writeln!(out, "{}", crate::ops::logging::Clean(line));
                        }
                    }
                    None => out.push_str("  (no role to check against its rules)\n"),
                }
            }
        }
        out
    }

    /// Whether a container with no role looks like a build container of
    /// gitlab-runner's native steps mode, which keeps the runner's
    /// `environment` (and so IAM_ROLE) out of the container.
    pub fn native_steps(c: &Container) -> bool {
        Self::container_type(c) == Some("build")
            && !c.env.iter().any(|e| e.starts_with("CI_JOB_ID="))
    }

    /// Whether a host process (in no container) may reach the real IMDS:
    /// only from an allow-listed cgroup, and never a container runtime or
    /// a build step. Being in no container proves nothing.
    pub fn host_access(&self, caller: &Caller) -> Result<(), HostRefusal> {
        let path = caller
            .cgroup_path
            .as_deref()
            .ok_or(HostRefusal::UnknownCgroup)?;
        if is_container_runtime(&caller.comm) {
            return Err(HostRefusal::ContainerRuntime(caller.comm.clone()));
        }
        if is_build_step(path) {
            return Err(HostRefusal::BuildStep(path.to_string()));
        }
        match &self.host_allow {
            Some(set) if set.is_match(path) => Ok(()),
            _ => Err(HostRefusal::NotAllowListed(path.to_string())),
        }
    }
}

/// Globs in which `*` and `?` never match `/` (`**` spans path segments):
/// `role/ci-*` must not admit `role/ci-x/admin`.
fn glob_set(flag: &'static str, patterns: &[String]) -> Result<Option<GlobSet>, PatternError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let err = |pattern: &str| {
        let pattern = pattern.to_string();
        move |source| PatternError {
            flag,
            pattern,
            source,
        }
    };
    let mut set = GlobSetBuilder::new();
    for p in patterns {
        set.add(
            GlobBuilder::new(p)
                .literal_separator(true)
                .build()
                .map_err(err(p))?,
        );
    }
    set.build().map(Some).map_err(err(&patterns.join(",")))
}

/// BuildKit's RUN steps: `<parent>/buildkit/<id>` (cgroupfs driver),
/// `buildkit-<id>.scope`-style units, and, with the systemd driver,
/// `docker-<25-char id>.scope`: any container runtime's scope whose id is
/// not a container's (a real container's 64-hex id makes it a container,
/// decided before host rules are asked).
fn is_build_step(path: &str) -> bool {
    path.split('/').any(|seg| {
        seg == "buildkit"
            || seg.starts_with("buildkit-")
            || seg.starts_with("buildkit.")
            || (seg.ends_with(".scope")
                && [
                    "docker-",
                    "libpod-",
                    "cri-containerd-",
                    "crio-",
                    "containerd-",
                ]
                .iter()
                .any(|p| seg.starts_with(p)))
    })
}

/// Host processes that act on behalf of containers or Docker API clients.
fn is_container_runtime(comm: &str) -> bool {
    matches!(
        comm,
        "dockerd" | "containerd" | "buildkitd" | "docker-proxy" | "runc" | "docker-init"
    ) || comm.starts_with("containerd-shim")
        || comm.starts_with("buildkit-runc")
}

/// STS's rule for ExternalId: 2-1224 characters of `[\w+=,.@:/-]`.
fn valid_external_id(id: &str) -> bool {
    (2..=1224).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@:/-".contains(c))
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
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::model::ids::ContainerId;

    fn account() -> Arc<OnceLock<AccountId>> {
        let a = Arc::new(OnceLock::new());
        a.set(AccountId::parse("123456789012").unwrap()).unwrap();
        a
    }

    fn policy(allow: &[&str]) -> Policy {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        Policy::new(&allow, &[], account()).unwrap()
    }

    fn container(env: &[&str], image_env: &[&str]) -> Container {
        Container {
            id: ContainerId::parse(&"ab".repeat(32)).unwrap(),
            name: "job".into(),
            labels: HashMap::from([(gitlab::JOB_LABEL.to_string(), "7".to_string())]),
            env: env.iter().map(|s| s.to_string()).collect(),
            image_env: image_env.iter().map(|s| s.to_string()).collect(),
            image_labels: HashMap::new(),
            addresses: None,
            cgroup: None,
        }
    }

    fn decide(p: &Policy, env: &[&str], image_env: &[&str]) -> RoleDecision {
        p.decide(&container(env, image_env))
    }

    fn role(arn: &str) -> RoleDecision {
        RoleDecision::Role(Role {
            arn: RoleArn::parse(arn).unwrap(),
            external_id: None,
            session_name: "gitlab-job-7".into(),
            session: Default::default(),
        })
    }

    #[test]
    fn a_decision_is_made_once_per_container_and_again_when_the_policy_changes() {
        let p = policy(&["arn:aws:iam::123456789012:role/*"]);
        let c = Arc::new(container(&["IAM_ROLE=ci-deploy"], &[]));
        let first = p.decision(&c);
        assert_eq!(*first, role("arn:aws:iam::123456789012:role/ci-deploy"));
        assert!(
            Arc::ptr_eq(&first, &p.decision(&c)),
            "asked again: the same answer"
        );

        // A file that admits nothing: the very next request is refused.
        let file =
            "[[rule]]\nroles = [\"arn:aws:iam::123456789012:role/other\"]\nprojects = [\"**\"]\n";
        p.set_file(Some(PolicyFile::parse("p.toml", file).unwrap()));
        assert!(
            matches!(
                *p.decision(&c),
                RoleDecision::Refused(RoleRefusal::PolicyFile { .. })
            ),
            "{:?}",
            p.decision(&c)
        );
        p.set_file(None);
        assert_eq!(*p.decision(&c), *first);

        // The same id with other facts (the cache let the container go and
        // inspected it anew) is decided anew, never served the old answer.
        let other = Arc::new(container(&["IAM_ROLE=ci-other"], &[]));
        assert_eq!(
            *p.decision(&other),
            role("arn:aws:iam::123456789012:role/ci-other")
        );
    }

    #[test]
    fn a_decision_made_before_the_account_was_known_is_made_again() {
        let account = Arc::new(OnceLock::new());
        let p = Policy::new(&[], &[], account.clone()).unwrap();
        let c = Arc::new(container(&["IAM_ROLE=ci-deploy"], &[]));
        assert_eq!(
            *p.decision(&c),
            RoleDecision::Refused(RoleRefusal::AccountUnknown)
        );
        account
            .set(AccountId::parse("123456789012").unwrap())
            .unwrap();
        assert_eq!(
            *p.decision(&c),
            role("arn:aws:iam::123456789012:role/ci-deploy")
        );
    }

    #[test]
    fn decisions_of_gone_containers_are_let_go() {
        let p = policy(&[]);
        let live = Arc::new(container(&["IAM_ROLE=ci-deploy"], &[]));
        p.decision(&live);
        for n in 0..1000 {
            let mut gone = container(&["IAM_ROLE=ci-deploy"], &[]);
            gone.id = ContainerId::parse(&format!("{n:064x}")).unwrap();
            p.decision(&Arc::new(gone));
        }
        // Pruned as it grows: bounded by the live containers, not by every
        // container ever seen.
        assert!(
            p.decisions_held() <= 2 * DECIDED_PRUNE_MIN,
            "{}",
            p.decisions_held()
        );
        assert!(Arc::ptr_eq(&p.decision(&live), &p.decision(&live)));
    }

    fn refused(d: RoleDecision) -> String {
        match d {
            RoleDecision::Refused(r) => r.to_string(),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn names_and_arns() {
        let p = policy(&[]);
        assert_eq!(
            decide(&p, &["IAM_ROLE=deploy"], &[]),
            role("arn:aws:iam::123456789012:role/deploy")
        );
        assert_eq!(
            decide(
                &p,
                &["IAM_ROLE=arn:aws:iam::123456789012:role/ci/deploy"],
                &[]
            ),
            role("arn:aws:iam::123456789012:role/ci/deploy")
        );
        let RoleDecision::Role(r) = decide(&p, &["IAM_ROLE=ci/deploy"], &[]) else {
            panic!()
        };
        assert_eq!(r.arn.name(), "deploy");
    }

    #[test]
    fn no_role_unless_the_runner_sets_one() {
        let p = policy(&[]);
        assert_eq!(decide(&p, &["PATH=/bin"], &[]), RoleDecision::NoRole);
        assert_eq!(decide(&p, &["IAM_ROLE="], &[]), RoleDecision::NoRole);
        // The image's ENV shows up in Config.Env too; it must not count.
        let from_image = decide(&p, &["IAM_ROLE=admin"], &["IAM_ROLE=admin"]);
        assert!(refused(from_image).contains("image"));
        // The runner overriding the image's value is the runner's choice.
        assert_eq!(
            decide(&p, &["IAM_ROLE=deploy"], &["IAM_ROLE=admin"]),
            role("arn:aws:iam::123456789012:role/deploy")
        );
        // ... and so is the runner clearing it.
        assert_eq!(
            decide(&p, &["IAM_ROLE="], &["IAM_ROLE=admin"]),
            RoleDecision::NoRole
        );
    }

    #[test]
    fn conflicting_or_malformed_values_are_refused() {
        let p = policy(&[]);
        assert!(refused(decide(&p, &["IAM_ROLE=a", "IAM_ROLE=b"], &[])).contains("more than once"));
        assert_eq!(
            decide(&p, &["IAM_ROLE=a", "IAM_ROLE=a"], &[]),
            role("arn:aws:iam::123456789012:role/a")
        );
        assert!(
            refused(decide(&p, &["IAM_ROLE=arn:aws:s3:::bucket"], &[])).contains("not a role ARN")
        );
        assert!(refused(decide(&p, &["IAM_ROLE=bad name"], &[])).contains("not a valid role name"));
        assert!(refused(decide(
            &p,
            &["IAM_ROLE=x", "IAM_EXTERNAL_ID=1", "IAM_EXTERNAL_ID=2"],
            &[]
        ))
        .contains("IAM_EXTERNAL_ID"));
    }

    #[test]
    fn allow_list_and_default_account_rule() {
        let p = policy(&[]);
        let other = decide(&p, &["IAM_ROLE=arn:aws:iam::999999999999:role/x"], &[]);
        assert!(refused(other).contains("account"));
        let unknown = Policy::new(&[], &[], Arc::new(OnceLock::new())).unwrap();
        assert_eq!(
            refused(decide(&unknown, &["IAM_ROLE=x"], &[])),
            "the instance profile's account is not known yet"
        );

        let p = policy(&["arn:aws:iam::*:role/ci-*"]);
        assert_eq!(
            decide(
                &p,
                &["IAM_ROLE=arn:aws:iam::999999999999:role/ci-build"],
                &[]
            ),
            role("arn:aws:iam::999999999999:role/ci-build")
        );
        assert!(refused(decide(&p, &["IAM_ROLE=admin"], &[])).contains("--allow-role"));
        let RoleDecision::Role(with_ext) =
            decide(&p, &["IAM_ROLE=ci-x", "IAM_EXTERNAL_ID=abc"], &[])
        else {
            panic!()
        };
        assert_eq!(with_ext.arn.as_str(), "arn:aws:iam::123456789012:role/ci-x");
        assert_eq!(with_ext.external_id.as_deref(), Some("abc"));
        let err = Policy::new(&["[".into()], &[], account()).unwrap_err();
        // The glob's own message comes once, as the source.
        assert_eq!(err.to_string(), "--allow-role \"[\"");
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(chain.matches("unclosed").count(), 1, "{chain}");
    }

    #[test]
    fn external_ids_follow_sts_rules_and_are_never_echoed() {
        let p = policy(&[]);
        let RoleDecision::Role(r) = decide(&p, &["IAM_ROLE=x", "IAM_EXTERNAL_ID=ab:c/d-1"], &[])
        else {
            panic!()
        };
        assert_eq!(r.external_id.as_deref(), Some("ab:c/d-1"));
        for bad in ["Q", "line\nINFO forged", "has space"] {
            let env = format!("IAM_EXTERNAL_ID={bad}");
            let reason = refused(decide(&p, &["IAM_ROLE=x", &env], &[]));
            assert!(
                reason.starts_with("IAM_EXTERNAL_ID is not a valid"),
                "{reason}"
            );
            assert!(!reason.contains(bad), "{reason}");
        }
        let long = format!("IAM_EXTERNAL_ID={}", "a".repeat(1225));
        assert!(matches!(
            decide(&p, &["IAM_ROLE=x", &long], &[]),
            RoleDecision::Refused(_)
        ));
    }

    #[test]
    fn roles_go_only_to_containers_the_runner_labelled() {
        let p = policy(&[]);
        // A classic `docker build` step with `ARG IAM_ROLE=ci-deploy`: the
        // value is in its environment, not in the image's ENV.
        let mut step = container(&["IAM_ROLE=ci-deploy"], &[]);
        step.labels.clear();
        assert_eq!(p.decide(&step), RoleDecision::Refused(RoleRefusal::NotAJob));
        // ... nor may an image carry the runner's label into one.
        step.image_labels
            .insert(gitlab::JOB_LABEL.into(), "7".into());
        step.labels.insert(gitlab::JOB_LABEL.into(), "7".into());
        assert_eq!(p.decide(&step), RoleDecision::Refused(RoleRefusal::NotAJob));
        // Without IAM_ROLE, nothing to refuse.
        let mut plain = container(&[], &[]);
        plain.labels.clear();
        assert_eq!(p.decide(&plain), RoleDecision::NoRole);
    }

    #[test]
    fn an_image_carrying_the_runners_type_label_is_refused() {
        // The type check reads the runner's label only; before, an image
        // bringing the label made it absent, and the check was skipped:
        // a helper-like container with IAM_ROLE got the role.
        let p = policy(&[]);
        let mut c = container(&["IAM_ROLE=ci-deploy"], &[]);
        c.labels
            .insert(gitlab::TYPE_LABEL.into(), "predefined".into());
        c.image_labels
            .insert(gitlab::TYPE_LABEL.into(), "predefined".into());
        assert_eq!(
            p.decide(&c),
            RoleDecision::Refused(RoleRefusal::ImageLabel(gitlab::TYPE_LABEL))
        );
        assert!(refused(p.decide(&c)).contains("the image carries"));
        // Whatever value either one has.
        c.labels.insert(gitlab::TYPE_LABEL.into(), "build".into());
        assert!(matches!(p.decide(&c), RoleDecision::Refused(_)));
        c.image_labels.clear();
        assert!(matches!(p.decide(&c), RoleDecision::Role(_)));
    }

    #[test]
    fn with_runners_listed_only_their_jobs_get_their_roles() {
        let p = policy(&[]);
        let file = r#"
[[runner]]
id = "abc123xy"
name = "deploy runner"
roles = ["arn:aws:iam::123456789012:role/deploy-*"]
"#;
        p.set_file(Some(PolicyFile::parse("runners.toml", file).unwrap()));
        let job = |runner: Option<&str>, role: &str| {
            let env = format!("IAM_ROLE={role}");
            let mut c = container(&[&env], &[]);
            if let Some(id) = runner {
                c.labels
                    .insert("com.gitlab.gitlab-runner.runner.id".into(), id.into());
            }
            c
        };
        assert!(matches!(
            p.decide(&job(Some("abc123xy"), "deploy-prod")),
            RoleDecision::Role(_)
        ));
        assert_eq!(
            refused(p.decide(&job(Some("other999"), "deploy-prod"))),
            "runner other999 is not listed in runners.toml"
        );
        assert!(refused(p.decide(&job(None, "deploy-prod")))
            .contains("no com.gitlab.gitlab-runner.runner.id label of the runner's own"));
        assert_eq!(
            refused(p.decide(&job(Some("abc123xy"), "admin"))),
            "arn:aws:iam::123456789012:role/admin is not in the roles of runner abc123xy (\"deploy runner\") in runners.toml"
        );
        // The image's label of that name is not the runner's.
        let mut forged = job(Some("abc123xy"), "deploy-prod");
        forged.image_labels.insert(
            "com.gitlab.gitlab-runner.runner.id".into(),
            "abc123xy".into(),
        );
        assert!(refused(p.decide(&forged)).contains("of the runner's own"));
        // `policy explain` says which runner and why.
        let text = p.explain(&job(Some("other999"), "deploy-prod"));
        assert!(
            text.contains("decision: refused: runner other999 is not listed in runners.toml"),
            "{text}"
        );
        assert!(text.contains("runner other999"), "{text}");
        assert!(
            text.contains("runners: no: runner other999 is not listed"),
            "{text}"
        );
    }

    #[test]
    fn rules_apply_on_top_of_the_runners() {
        let p = policy(&[]);
        let file = r#"
[[runner]]
id = "abc123xy"
roles = ["arn:aws:iam::123456789012:role/*"]

[[rule]]
roles = ["arn:aws:iam::123456789012:role/deploy-*"]
projects = ["42"]
"#;
        p.set_file(Some(PolicyFile::parse("p.toml", file).unwrap()));
        let job = |project: &str| {
            let mut c = container(&["IAM_ROLE=deploy-prod"], &[]);
            c.labels.insert(
                "com.gitlab.gitlab-runner.runner.id".into(),
                "abc123xy".into(),
            );
            c.labels
                .insert("com.gitlab.gitlab-runner.project.id".into(), project.into());
            c
        };
        assert!(matches!(p.decide(&job("42")), RoleDecision::Role(_)));
        assert!(refused(p.decide(&job("43"))).starts_with("no rule in p.toml allows"));
    }

    #[test]
    fn role_globs_never_cross_a_path_separator() {
        let p = policy(&["arn:aws:iam::123456789012:role/ci-*"]);
        assert!(matches!(
            decide(&p, &["IAM_ROLE=ci-x"], &[]),
            RoleDecision::Role(_)
        ));
        // Role `admin` under path /ci-x/ is not a `ci-*` role.
        let pathed = decide(
            &p,
            &["IAM_ROLE=arn:aws:iam::123456789012:role/ci-x/admin"],
            &[],
        );
        assert!(refused(pathed).contains("--allow-role"));
        assert!(refused(decide(&p, &["IAM_ROLE=ci-x/admin"], &[])).contains("--allow-role"));
        // `**` is how an admin admits paths on purpose.
        let p = policy(&["arn:aws:iam::123456789012:role/ci/**"]);
        assert!(matches!(
            decide(
                &p,
                &["IAM_ROLE=arn:aws:iam::123456789012:role/ci/x/deploy"],
                &[]
            ),
            RoleDecision::Role(_)
        ));
    }

    fn caller(path: Option<&str>, comm: &str) -> Caller {
        Caller {
            peer: crate::kernel::addrs::ClientAddr("127.0.0.1:1".parse().unwrap()),
            cgroup: crate::model::ids::CgroupId(1),
            cgroup_path: path.map(Into::into),
            pid: 1,
            comm: comm.into(),
            original_dst: "169.254.169.254:80".parse().unwrap(),
            boot_ns: 0,
        }
    }

    #[test]
    fn host_processes_pass_only_from_allow_listed_cgroups() {
        let none = Policy::new(&[], &[], account()).unwrap();
        let agent = caller(Some("/system.slice/amazon-ssm-agent.service"), "ssm-agent");
        assert!(matches!(
            none.host_access(&agent),
            Err(HostRefusal::NotAllowListed(_))
        ));
        let p = Policy::new(
            &[],
            &[
                "/system.slice/amazon-ssm-agent.service".into(),
                "/system.slice/gitlab-runner*".into(),
            ],
            account(),
        )
        .unwrap();
        assert_eq!(p.host_access(&agent), Ok(()));
        assert_eq!(
            p.host_access(&caller(
                Some("/system.slice/gitlab-runner.service"),
                "gitlab-runner"
            )),
            Ok(())
        );
        for (path, comm) in [
            ("/", "curl"),
            ("/system.slice/gitlab-runner.service/x", "sh"),
            ("/system.slice/docker.service", "curl"),
            ("/user.slice/user-0.slice/session-1.scope", "curl"),
        ] {
            assert!(p.host_access(&caller(Some(path), comm)).is_err(), "{path}");
        }
        // Allow-listed or not, runtimes and build steps never pass.
        let wide = Policy::new(&[], &["/**".into()], account()).unwrap();
        assert!(matches!(
            wide.host_access(&caller(Some("/system.slice/docker.service"), "dockerd")),
            Err(HostRefusal::ContainerRuntime(_))
        ));
        for step in [
            "/docker/buildkit/abcdefghijklmnopqrstuvwxy",
            "/system.slice/buildkit-abc.scope",
            "/system.slice/docker-lq1hn4a0qq7ek6tq8tqmb9p8u.scope",
        ] {
            assert!(matches!(
                wide.host_access(&caller(Some(step), "sh")),
                Err(HostRefusal::BuildStep(_))
            ));
        }
        assert_eq!(
            wide.host_access(&caller(None, "sh")),
            Err(HostRefusal::UnknownCgroup)
        );
    }

    #[test]
    fn session_names_follow_sts_rules() {
        assert_eq!(
            gitlab::clean_session_name("gitlab-job-12345"),
            "gitlab-job-12345"
        );
        assert_eq!(
            gitlab::clean_session_name("job 7/deploy:prod"),
            "job-7-deploy-prod"
        );
        assert_eq!(gitlab::clean_session_name("a"), "a-");
        assert_eq!(gitlab::clean_session_name(""), "--");
        assert_eq!(gitlab::clean_session_name("ü"), "--");
        assert_eq!(gitlab::clean_session_name(&"x".repeat(100)).len(), 64);
        assert_eq!(gitlab::clean_session_name("a+b=c,d.e@f_g"), "a+b=c,d.e@f_g");
        let mut c = container(&[], &[]);
        c.labels.insert(gitlab::JOB_LABEL.into(), "42".into());
        assert_eq!(gitlab::session_name(&c), "gitlab-job-42");
        c.labels.clear();
        assert_eq!(gitlab::session_name(&c), "container-abababababab");
    }
}
