//! The role policy by runner, project and ref: a small TOML file whose
//! entries say which roles which runners' jobs, and which projects on which
//! refs, may get. Default deny: with a file in force, a role the file does
//! not allow is refused. The runner-set `IAM_ROLE` still chooses the role;
//! the file only narrows who may have it.
//!
//! ```toml
//! [[runner]]
//! id = "abc123xy"                     # gitlab-runner's runner.id label
//! name = "deploy runner"              # for humans; optional
//! roles = ["arn:aws:iam::123456789012:role/deploy-*"]
//!
//! [[rule]]
//! roles = ["arn:aws:iam::123456789012:role/deploy-*"]
//! projects = ["group/app", "42"]      # a path glob, or a project id
//! refs = ["main", "release/*"]        # ref name globs; any if absent
//! protected = true                    # only protected refs; any if absent
//! ref_type = "branch"                 # "branch" or "tag"; ID tokens only
//! environments = ["production"]       # environment globs; ID tokens only
//! environment_protected = true        # ID tokens only
//! ```
//!
//! With any `[[runner]]` entry, a container of a runner not listed (or with
//! no runner label of the runner's own) gets nothing, and a listed runner's
//! jobs get only its `roles`. With any `[[rule]]`, a rule must allow the
//! role too. A file with neither allows nothing.
//!
//! The facts come from what gitlab-runner wrote: its labels (runner id,
//! project id, ref) and its predefined variables (`CI_PROJECT_PATH`,
//! `CI_COMMIT_REF_PROTECTED`) where they are unambiguous and belong to the
//! labelled project ([`crate::model::session`] says when), never what only the
//! image set. For a job with a verified GitLab ID token they come from its
//! claims instead, and the labels and variables are ignored (the runner id
//! still comes from the runner's label: the claim's `runner_id` is GitLab's
//! numeric id, not the short token the label and `[[runner]]` use). The
//! keys only claims carry (`ref_type`, `environments`,
//! `environment_protected`) match no job without a token. A file that does not parse is never half-applied: loading it
//! fails with the line, and a reload keeps the policy in force.

use std::{fmt::Write as _, path::Path};

use globset::{GlobMatcher, GlobSet, GlobSetBuilder};
use serde::Deserialize;

pub use super::facts::{FactSource, Facts};
use super::globs::glob;
use crate::model::ids::RoleArn;

#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// TOML syntax or an unknown key; the message names line and column.
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}, line {line}: {message}")]
    Rule {
        path: String,
        line: usize,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    #[serde(default)]
    rule: Vec<toml::Spanned<RuleToml>>,
    #[serde(default)]
    runner: Vec<toml::Spanned<RunnerToml>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunnerToml {
    id: String,
    #[serde(default)]
    name: Option<String>,
    roles: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleToml {
    roles: Vec<String>,
    projects: Vec<String>,
    #[serde(default)]
    refs: Option<Vec<String>>,
    #[serde(default)]
    protected: Option<bool>,
    #[serde(default)]
    ref_type: Option<RefType>,
    #[serde(default)]
    environments: Option<Vec<String>>,
    #[serde(default)]
    environment_protected: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RefType {
    Branch,
    Tag,
}

impl RefType {
    fn name(self) -> &'static str {
        match self {
            Self::Branch => "branch",
            Self::Tag => "tag",
        }
    }
}

#[derive(Debug)]
enum Project {
    Id(String),
    Path(GlobMatcher),
}

#[derive(Debug)]
struct Rule {
    line: usize,
    roles: GlobSet,
    role_patterns: Vec<String>,
    projects: Vec<(Project, String)>,
    refs: Option<(GlobSet, Vec<String>)>,
    protected: Option<bool>,
    ref_type: Option<RefType>,
    environments: Option<(GlobSet, Vec<String>)>,
    environment_protected: Option<bool>,
}

/// A `[[runner]]` entry: the roles one runner's jobs may get.
#[derive(Debug)]
struct Runner {
    line: usize,
    id: String,
    name: Option<String>,
    roles: GlobSet,
    role_patterns: Vec<String>,
}

impl std::fmt::Display for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(name) => write!(f, "runner {} ({name:?})", self.id),
            None => write!(f, "runner {}", self.id),
        }
    }
}

/// A loaded, validated policy file.
#[derive(Debug)]
pub struct PolicyFile {
    path: String,
    rules: Vec<Rule>,
    runners: Vec<Runner>,
}

/// Why the file in force refuses a role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileRefusal {
    /// The file lists runners, and the container has no runner label of
    /// the runner's own (none, or one its image brought).
    #[error("the container has no com.gitlab.gitlab-runner.runner.id label of the runner's own, and {path} lists runners: only their jobs get roles")]
    NoRunner { arn: RoleArn, path: String },
    #[error("runner {runner} is not listed in {path}")]
    RunnerNotListed {
        arn: RoleArn,
        runner: String,
        path: String,
    },
    #[error("{arn} is not in the roles of {runner} in {path}")]
    NotTheRunnersRole {
        arn: RoleArn,
        /// The entry as people read it: id and name.
        runner: String,
        path: String,
    },
    #[error("no rule in {path} allows {arn} for {facts}")]
    NoRule {
        arn: RoleArn,
        facts: String,
        path: String,
    },
}

impl FileRefusal {
    /// The role refused.
    pub fn arn(&self) -> &RoleArn {
        match self {
            Self::NoRunner { arn, .. }
            | Self::RunnerNotListed { arn, .. }
            | Self::NotTheRunnersRole { arn, .. }
            | Self::NoRule { arn, .. } => arn,
        }
    }
}

/// Where a TOML table starts, as a line number.
fn line_of(text: &str, offset: usize) -> usize {
    1 + text[..offset.min(text.len())].matches('\n').count()
}

/// A list of role ARN globs, checked.
fn role_globs(roles: &[String]) -> Result<GlobSet, String> {
    if roles.is_empty() {
        return Err("roles: list at least one role ARN glob".into());
    }
    if let Some(bad) = roles.iter().find(|p| !p.starts_with("arn:")) {
        return Err(format!(
            "roles: {bad:?} is not a role ARN glob (arn:aws:iam::ACCOUNT:role/NAME)"
        ));
    }
    glob_set(roles).map_err(|e| format!("roles: {e}"))
}

/// gitlab-runner's short token, as its `runner.id` label has it; never a
/// glob.
fn valid_runner_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn glob_set(patterns: &[String]) -> Result<GlobSet, String> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(glob(p).map_err(|e| format!("{p:?}: {e}"))?);
    }
    b.build().map_err(|e| e.to_string())
}

impl PolicyFile {
    pub fn load(path: &Path) -> Result<Self, PolicyFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    pub fn parse(path: &str, text: &str) -> Result<Self, PolicyFileError> {
        let file: FileToml = toml::from_str(text).map_err(|e| PolicyFileError::Parse {
            path: path.to_string(),
            message: e.to_string().trim_end().replace('\n', " | "),
        })?;
        let mut runners: Vec<Runner> = Vec::new();
        for spanned in file.runner {
            let line = line_of(text, spanned.span().start);
            let err = |message: String| PolicyFileError::Rule {
                path: path.to_string(),
                line,
                message,
            };
            let r = spanned.into_inner();
            if !valid_runner_id(&r.id) {
                return Err(err(format!(
                    "id: {:?} is not a runner id (the runner's com.gitlab.gitlab-runner.runner.id label: 1-64 letters, digits and _.-, no globs)",
                    r.id
                )));
            }
            if let Some(first) = runners.iter().find(|o| o.id == r.id) {
                return Err(err(format!(
                    "id: runner {} is listed already, at line {}",
                    r.id, first.line
                )));
            }
            let roles = role_globs(&r.roles).map_err(err)?;
            runners.push(Runner {
                line,
                id: r.id,
                name: r.name.filter(|n| !n.is_empty()),
                roles,
                role_patterns: r.roles,
            });
        }
        let mut rules = Vec::new();
        for spanned in file.rule {
            let line = line_of(text, spanned.span().start);
            let err = |message: String| PolicyFileError::Rule {
                path: path.to_string(),
                line,
                message,
            };
            let r = spanned.into_inner();
            let roles = role_globs(&r.roles).map_err(err)?;
            if r.projects.is_empty() {
                return Err(err(
                    "projects: list at least one project path glob or id (\"**\" for any)".into(),
                ));
            }
            let mut projects = Vec::new();
            for p in &r.projects {
                let matcher = if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
                    Project::Id(p.clone())
                } else {
                    Project::Path(
                        glob(p)
                            .map_err(|e| err(format!("projects: {p:?}: {e}")))?
                            .compile_matcher(),
                    )
                };
                projects.push((matcher, p.clone()));
            }
            let refs = match r.refs {
                None => None,
                Some(refs) if refs.is_empty() => {
                    return Err(err(
                        "refs: an empty list allows no ref; leave it out to allow any".into(),
                    ))
                }
                Some(refs) => Some((
                    glob_set(&refs).map_err(|e| err(format!("refs: {e}")))?,
                    refs,
                )),
            };
            let environments = match r.environments {
                None => None,
                Some(envs) if envs.is_empty() => return Err(err(
                    "environments: an empty list allows no environment; leave it out to allow any"
                        .into(),
                )),
                Some(envs) => Some((
                    glob_set(&envs).map_err(|e| err(format!("environments: {e}")))?,
                    envs,
                )),
            };
            rules.push(Rule {
                line,
                roles,
                role_patterns: r.roles,
                projects,
                refs,
                protected: r.protected,
                ref_type: r.ref_type,
                environments,
                environment_protected: r.environment_protected,
            });
        }
        Ok(Self {
            path: path.to_string(),
            rules,
            runners,
        })
    }

    /// Whether any entry could allow `role` to some job: a rule or a
    /// runner entry names it (`metaproxy doctor` asks, for the roles of the
    /// runner configs).
    pub fn names(&self, role: &RoleArn) -> bool {
        let by_runner =
            self.runners.is_empty() || self.runners.iter().any(|r| r.roles.is_match(role.as_str()));
        let by_rule = (self.rules.is_empty() && !self.runners.is_empty())
            || self.rules.iter().any(|r| r.roles.is_match(role.as_str()));
        by_runner && by_rule
    }

    /// How many `[[rule]]` entries the file has.
    pub fn rules(&self) -> usize {
        self.rules.len()
    }

    /// How many `[[runner]]` entries the file has.
    pub fn runners(&self) -> usize {
        self.runners.len()
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether the file lets a container with `facts` have `role`: its
    /// runner must be listed and have the role (when the file lists
    /// runners), and a rule must allow it (when the file has rules, or
    /// lists no runners either).
    pub fn check(&self, role: &RoleArn, facts: &Facts) -> Result<(), FileRefusal> {
        if !self.runners.is_empty() {
            let runner = self.runner_of(role, facts)?;
            if !runner.roles.is_match(role.as_str()) {
                return Err(FileRefusal::NotTheRunnersRole {
                    arn: role.clone(),
                    runner: runner.to_string(),
                    path: self.path.clone(),
                });
            }
        }
        if (!self.rules.is_empty() || self.runners.is_empty()) && self.allows(role, facts).is_none()
        {
            return Err(FileRefusal::NoRule {
                arn: role.clone(),
                facts: facts.to_string(),
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// The `[[runner]]` entry of the container's runner.
    fn runner_of(&self, role: &RoleArn, facts: &Facts) -> Result<&Runner, FileRefusal> {
        let Some(id) = &facts.runner_id else {
            return Err(FileRefusal::NoRunner {
                arn: role.clone(),
                path: self.path.clone(),
            });
        };
        self.runners
            .iter()
            .find(|r| r.id == *id)
            .ok_or_else(|| FileRefusal::RunnerNotListed {
                arn: role.clone(),
                runner: id.clone(),
                path: self.path.clone(),
            })
    }

    /// The first rule that allows `role` for `facts`, by line.
    pub fn allows(&self, role: &RoleArn, facts: &Facts) -> Option<usize> {
        self.rules
            .iter()
            .find(|r| r.check(role, facts).is_ok())
            .map(|r| r.line)
    }

    /// Entry by entry, why each does or does not allow `role` for `facts`.
    pub fn explain(&self, role: &RoleArn, facts: &Facts) -> String {
        let mut out = String::new();
        if !self.runners.is_empty() {
            let _ = match self.runner_of(role, facts) {
                Err(why) => writeln!(out, "  runners: no: {why}"),
                Ok(r) if r.roles.is_match(role.as_str()) => {
                    writeln!(out, "  {r} at line {}: allows {role}", r.line)
                }
                Ok(r) => writeln!(
                    out,
                    "  {r} at line {}: no: {role} is not in roles {:?}",
                    r.line, r.role_patterns
                ),
            };
            if self.rules.is_empty() {
                let _ = writeln!(out, "  no rules: the runner's roles alone decide");
            }
        }
        if self.rules.is_empty() && self.runners.is_empty() {
            let _ = writeln!(out, "  {} has no rules: every role is refused", self.path);
        }
        for r in &self.rules {
            let _ = match r.check(role, facts) {
                Ok(()) => writeln!(out, "  rule at line {}: allows", r.line),
                Err(why) => writeln!(out, "  rule at line {}: no: {why}", r.line),
            };
        }
        out
    }
}

impl Rule {
    fn check(&self, role: &RoleArn, facts: &Facts) -> Result<(), String> {
        if !self.roles.is_match(role.as_str()) {
            return Err(format!("{role} is not in roles {:?}", self.role_patterns));
        }
        let project = self.projects.iter().any(|(p, _)| match p {
            Project::Id(id) => facts.project_id.as_deref() == Some(id),
            Project::Path(m) => facts.project_path.as_deref().is_some_and(|p| m.is_match(p)),
        });
        if !project {
            return Err(format!(
                "project {} (id {}) is not in projects {:?}",
                facts.project_path.as_deref().unwrap_or("?"),
                facts.project_id.as_deref().unwrap_or("?"),
                self.projects.iter().map(|(_, s)| s).collect::<Vec<_>>()
            ));
        }
        if let Some((refs, patterns)) = &self.refs {
            if !facts.git_ref.as_deref().is_some_and(|r| refs.is_match(r)) {
                return Err(format!(
                    "ref {} is not in refs {patterns:?}",
                    facts.git_ref.as_deref().unwrap_or("?")
                ));
            }
        }
        if self.protected == Some(true) && !facts.protected {
            return Err("the ref is not protected".into());
        }
        if self.protected == Some(false) && facts.protected {
            return Err("the rule is for unprotected refs only".into());
        }
        if let Some(kind) = self.ref_type {
            if facts.ref_type.as_deref() != Some(kind.name()) {
                return Err(format!(
                    "ref type {} is not {} (only an ID token tells)",
                    facts.ref_type.as_deref().unwrap_or("?"),
                    kind.name()
                ));
            }
        }
        if let Some((envs, patterns)) = &self.environments {
            if !facts
                .environment
                .as_deref()
                .is_some_and(|e| envs.is_match(e))
            {
                return Err(format!(
                    "environment {} is not in environments {patterns:?} (only an ID token tells)",
                    facts.environment.as_deref().unwrap_or("?")
                ));
            }
        }
        if let Some(wanted) = self.environment_protected {
            if facts.environment_protected != Some(wanted) {
                return Err(if wanted {
                    "the environment is not protected (only an ID token tells)".into()
                } else {
                    "the rule is for unprotected environments only (only an ID token tells)".into()
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
