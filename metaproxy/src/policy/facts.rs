//! What the policy file decides on, read from a container: gitlab-runner's
//! labels and variables, or the claims of the job's verified ID token.

use crate::model::{container::Container, gitlab::Fact, id_token::IdToken};

/// Where a container's facts came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FactSource {
    /// gitlab-runner's labels and predefined variables.
    #[default]
    Runner,
    /// The claims of the job's verified GitLab ID token.
    IdToken,
}

/// What the policy file decides on, read from the container.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Facts {
    /// gitlab-runner's `runner.id` label (its short token).
    pub runner_id: Option<String>,
    pub project_id: Option<String>,
    pub project_path: Option<String>,
    pub git_ref: Option<String>,
    pub protected: bool,
    /// `branch` or `tag`: ID tokens only.
    pub ref_type: Option<String>,
    /// ID tokens only.
    pub environment: Option<String>,
    /// ID tokens only.
    pub environment_protected: Option<bool>,
    pub source: FactSource,
}

impl Facts {
    /// From the runner's labels and variables.
    pub fn of(c: &Container) -> Self {
        Self {
            runner_id: Fact::RunnerId.value(c),
            project_id: Fact::ProjectId.value(c),
            project_path: Fact::ProjectPath.value(c),
            git_ref: Fact::Ref.value(c),
            protected: Fact::Protected.value(c).as_deref() == Some("true"),
            ..Self::default()
        }
    }

    /// From the claims of `token` where the job has a verified one (the
    /// runner id still from the runner's label), else as [`Facts::of`].
    pub fn for_container(c: &Container, token: Option<&IdToken>) -> Self {
        let Some(token) = token else {
            return Self::of(c);
        };
        let claims = &token.claims;
        Self {
            runner_id: Fact::RunnerId.value(c),
            project_id: Some(claims.project_id.clone()),
            project_path: Some(claims.project_path.clone()),
            git_ref: Some(claims.git_ref.clone()),
            protected: claims.ref_protected,
            ref_type: claims.ref_type.clone(),
            environment: claims.environment.clone(),
            environment_protected: claims.environment_protected,
            source: FactSource::IdToken,
        }
    }
}

impl std::fmt::Display for Facts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "project {} (id {}) on ref {} ({}), runner {}",
            self.project_path.as_deref().unwrap_or("?"),
            self.project_id.as_deref().unwrap_or("?"),
            self.git_ref.as_deref().unwrap_or("?"),
            if self.protected {
                "protected"
            } else {
                "not protected"
            },
            self.runner_id.as_deref().unwrap_or("?"),
        )?;
        if let Some(kind) = &self.ref_type {
            write!(f, ", ref type {kind}")?;
        }
        if let Some(env) = &self.environment {
            let protected = match self.environment_protected {
                Some(true) => " (protected)",
                Some(false) => " (not protected)",
                None => "",
            };
            write!(f, ", environment {env}{protected}")?;
        }
        Ok(())
    }
}
