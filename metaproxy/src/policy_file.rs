//! The role policy by project and ref: a small TOML file whose rules say
//! which roles which projects may get on which refs. Default deny: with a
//! file in force, a role no rule allows is refused. The runner-set
//! `IAM_ROLE` still chooses the role; the file only narrows who may have it.
//!
//! ```toml
//! [[rule]]
//! roles = ["arn:aws:iam::123456789012:role/deploy-*"]
//! projects = ["group/app", "42"]      # a path glob, or a project id
//! refs = ["main", "release/*"]        # ref name globs; any if absent
//! protected = true                    # only protected refs; any if absent
//! ```
//!
//! The facts come from what gitlab-runner wrote: its labels (project id,
//! ref) and the first occurrence of its predefined variables
//! (`CI_PROJECT_PATH`, `CI_COMMIT_REF_PROTECTED`), never what only the
//! image set. A file that does not parse is never half-applied: loading it
//! fails with the line, and a reload keeps the policy in force.

use std::{fmt::Write as _, path::Path};

use globset::{Glob, GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};
use serde::Deserialize;

use crate::{identity::Container, ids::RoleArn, session};

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
}

/// A loaded, validated policy file.
#[derive(Debug)]
pub struct PolicyFile {
    path: String,
    rules: Vec<Rule>,
}

/// What the policy file decides on, read from the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub project_id: Option<String>,
    pub project_path: Option<String>,
    pub git_ref: Option<String>,
    pub protected: bool,
}

impl Facts {
    pub fn of(c: &Container) -> Self {
        Self {
            project_id: session::TagSource::ProjectId.value(c),
            project_path: session::TagSource::ProjectPath.value(c),
            git_ref: session::TagSource::Ref.value(c),
            protected: session::TagSource::Protected.value(c).as_deref() == Some("true"),
        }
    }
}

impl std::fmt::Display for Facts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "project {} (id {}) on ref {} ({})",
            self.project_path.as_deref().unwrap_or("?"),
            self.project_id.as_deref().unwrap_or("?"),
            self.git_ref.as_deref().unwrap_or("?"),
            if self.protected {
                "protected"
            } else {
                "not protected"
            }
        )
    }
}

fn glob(pattern: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(pattern).literal_separator(true).build()
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
        let mut rules = Vec::new();
        for spanned in file.rule {
            let line = 1 + text[..spanned.span().start.min(text.len())]
                .matches('\n')
                .count();
            let err = |message: String| PolicyFileError::Rule {
                path: path.to_string(),
                line,
                message,
            };
            let r = spanned.into_inner();
            if r.roles.is_empty() {
                return Err(err("roles: list at least one role ARN glob".into()));
            }
            if r.projects.is_empty() {
                return Err(err(
                    "projects: list at least one project path glob or id (\"**\" for any)".into(),
                ));
            }
            if let Some(bad) = r.roles.iter().find(|p| !p.starts_with("arn:")) {
                return Err(err(format!(
                    "roles: {bad:?} is not a role ARN glob (arn:aws:iam::ACCOUNT:role/NAME)"
                )));
            }
            let roles = glob_set(&r.roles).map_err(|e| err(format!("roles: {e}")))?;
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
            rules.push(Rule {
                line,
                roles,
                role_patterns: r.roles,
                projects,
                refs,
                protected: r.protected,
            });
        }
        Ok(Self {
            path: path.to_string(),
            rules,
        })
    }

    pub fn rules(&self) -> usize {
        self.rules.len()
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The first rule that allows `role` for `facts`, by line.
    pub fn allows(&self, role: &RoleArn, facts: &Facts) -> Option<usize> {
        self.rules
            .iter()
            .find(|r| r.check(role, facts).is_ok())
            .map(|r| r.line)
    }

    /// Rule by rule, why each does or does not allow `role` for `facts`.
    pub fn explain(&self, role: &RoleArn, facts: &Facts) -> String {
        let mut out = String::new();
        if self.rules.is_empty() {
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
# deploys: only the app, only from protected release refs
[[rule]]
roles = ["arn:aws:iam::123456789012:role/deploy-*"]
projects = ["group/app", "77"]
refs = ["main", "release/*"]
protected = true

[[rule]]
roles = ["arn:aws:iam::123456789012:role/read-only"]
projects = ["group/**"]
"#;

    fn facts(path: &str, id: &str, r: &str, protected: bool) -> Facts {
        Facts {
            project_id: Some(id.into()),
            project_path: Some(path.into()),
            git_ref: Some(r.into()),
            protected,
        }
    }

    fn arn(name: &str) -> RoleArn {
        RoleArn::parse(&format!("arn:aws:iam::123456789012:role/{name}")).unwrap()
    }

    #[test]
    fn rules_admit_projects_on_refs_and_deny_the_rest() {
        let p = PolicyFile::parse("policy.toml", FILE).unwrap();
        assert_eq!(p.rules(), 2);
        let deploy = arn("deploy-prod");
        assert_eq!(
            p.allows(&deploy, &facts("group/app", "1", "main", true)),
            Some(3)
        );
        assert_eq!(
            p.allows(&deploy, &facts("other/x", "77", "release/1", true)),
            Some(3)
        );
        assert_eq!(
            p.allows(&deploy, &facts("group/app", "1", "main", false)),
            None
        );
        assert_eq!(
            p.allows(&deploy, &facts("group/app", "1", "feature/x", true)),
            None
        );
        assert_eq!(
            p.allows(&deploy, &facts("group/other", "2", "main", true)),
            None
        );
        // `*` in a ref glob stays within one path segment.
        assert_eq!(
            p.allows(&deploy, &facts("group/app", "1", "release/1/x", true)),
            None
        );
        let ro = arn("read-only");
        assert_eq!(
            p.allows(&ro, &facts("group/sub/lib", "5", "dev", false)),
            Some(9)
        );
        assert_eq!(
            p.allows(&arn("admin"), &facts("group/app", "1", "main", true)),
            None
        );
        let why = p.explain(&deploy, &facts("group/app", "1", "main", false));
        assert!(
            why.contains("rule at line 3: no: the ref is not protected"),
            "{why}"
        );
        assert!(
            why.contains(
                "rule at line 9: no: arn:aws:iam::123456789012:role/deploy-prod is not in roles"
            ),
            "{why}"
        );
    }

    #[test]
    fn errors_name_the_line_and_what_is_wrong() {
        for (text, want) in [
            ("[[rule]]\nroles = [\"arn:aws:iam::1:role/x\"]\nprojects = []\n", "line 1: projects"),
            ("[[rule]]\nroles = [\"deploy\"]\nprojects = [\"a\"]\n", "line 1: roles: \"deploy\" is not a role ARN glob"),
            ("\n\n[[rule]]\nroles = [\"arn:[\"]\nprojects = [\"a\"]\n", "line 3: roles"),
            ("[[rule]]\nroles = [\"arn:aws:iam::1:role/x\"]\nprojects = [\"a\"]\nrefz = [\"main\"]\n", "unknown field `refz`"),
            ("[[rule]\n", "line 1"),
            ("[[rule]]\nroles = [\"arn:aws:iam::1:role/x\"]\nprojects = [\"a\"]\nrefs = []\n", "refs: an empty list"),
        ] {
            let e = PolicyFile::parse("p.toml", text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.starts_with("p.toml"), "{e}");
        }
    }
}
