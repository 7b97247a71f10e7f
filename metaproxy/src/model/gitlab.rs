//! What gitlab-runner writes into the containers it starts for a job, and
//! how much of it can be believed.
//!
//! gitlab-runner's Docker executor labels each job container
//! (`com.gitlab.gitlab-runner.<key>`) and puts its predefined variables
//! into the environment, before the job's own. The image's labels and
//! `ENV` end up in the same places, and the job's variables in the same
//! environment. So a value counts as the runner's only where nothing else
//! could have written it:
//!
//! * a label counts only if the image does not carry one of that name;
//! * a variable counts only if every occurrence agrees, and not if only
//!   the image's `ENV` set it;
//! * a project variable (`CI_PROJECT_PATH`, `CI_COMMIT_REF_PROTECTED`)
//!   counts only where `CI_PROJECT_ID` is the project of the runner's
//!   label.

use super::container::Container;

/// The prefix of every label gitlab-runner sets.
pub const LABEL_PREFIX: &str = "com.gitlab.gitlab-runner.";
/// gitlab-runner labels its job containers with the job id.
pub const JOB_LABEL: &str = "com.gitlab.gitlab-runner.job.id";
/// gitlab-runner's label for the kind of container: `build`, `service`,
/// or `predefined` for its helper.
pub const TYPE_LABEL: &str = "com.gitlab.gitlab-runner.type";
/// gitlab-runner's label for the runner that started the container.
pub const RUNNER_LABEL: &str = "com.gitlab.gitlab-runner.runner.id";

/// gitlab-runner's label `com.gitlab.gitlab-runner.<key>`.
pub fn label(key: &str) -> String {
    format!("{LABEL_PREFIX}{key}")
}

/// Whether the runner, not the image, set `label` on `c` (a container
/// inherits its image's labels).
pub fn runner_set(c: &Container, label: &str) -> bool {
    c.labels.contains_key(label) && !c.image_labels.contains_key(label)
}

/// Why a variable's value cannot be taken as the runner's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unclear {
    #[error("{0} is set more than once with different values")]
    Conflicting(&'static str),
    #[error("{0} comes from the image's ENV; only the runner may set it")]
    FromImage(&'static str),
}

/// A fact about a job that gitlab-runner writes into its containers: the
/// policy file's rules and the session tags are made of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fact {
    ProjectId,
    ProjectPath,
    PipelineId,
    JobId,
    Ref,
    Protected,
    RunnerId,
}

impl Fact {
    pub const ALL: [Fact; 7] = [
        Self::ProjectId,
        Self::ProjectPath,
        Self::PipelineId,
        Self::JobId,
        Self::Ref,
        Self::Protected,
        Self::RunnerId,
    ];

    /// The name used on the command line (`--session-tag-name SOURCE=NAME`).
    pub fn name(self) -> &'static str {
        match self {
            Self::ProjectId => "project-id",
            Self::ProjectPath => "project-path",
            Self::PipelineId => "pipeline-id",
            Self::JobId => "job-id",
            Self::Ref => "ref",
            Self::Protected => "protected",
            Self::RunnerId => "runner-id",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The value the runner set for this container, if any.
    pub fn value(self, c: &Container) -> Option<String> {
        match self {
            Self::ProjectId => runner_label(c, "project.id"),
            Self::PipelineId => runner_label(c, "pipeline.id"),
            Self::JobId => runner_label(c, "job.id"),
            Self::Ref => runner_label(c, "job.ref"),
            Self::RunnerId => runner_label(c, "runner.id"),
            Self::ProjectPath => project_variable(c, "CI_PROJECT_PATH"),
            Self::Protected => project_variable(c, "CI_COMMIT_REF_PROTECTED"),
        }
    }
}

/// gitlab-runner's label `com.gitlab.gitlab-runner.<key>`, unless the image
/// brought one of that name (a container inherits its image's labels).
pub fn runner_label(c: &Container, key: &str) -> Option<String> {
    let key = label(key);
    c.labels
        .get(&key)
        .filter(|_| !c.image_labels.contains_key(&key))
        .cloned()
}

/// A predefined variable about the project, only where the container's
/// `CI_PROJECT_ID` is the project of the runner's label: a container whose
/// variables name another project, or none, says nothing about its path or
/// whether its ref is protected.
fn project_variable(c: &Container, key: &str) -> Option<String> {
    let labelled = runner_label(c, "project.id")?;
    if runner_variable(c, "CI_PROJECT_ID").as_deref() != Some(labelled.as_str()) {
        return None;
    }
    runner_variable(c, key)
}

/// The value of `key` in the container's environment, where every
/// occurrence agrees, unless only the image's `ENV` set it. Occurrences
/// that disagree make it unknown: taking the first would trust the order
/// of the runner's variables and the job's, which this daemon cannot see.
pub fn runner_variable(c: &Container, key: &str) -> Option<String> {
    let prefix = format!("{key}=");
    let mut values = c.env.iter().filter_map(|e| e.strip_prefix(&prefix));
    let first = values.next()?;
    let mut occurrences = 1;
    for other in values {
        if other != first {
            return None;
        }
        occurrences += 1;
    }
    let from_image = c
        .image_env
        .iter()
        .any(|e| e.strip_prefix(&prefix) == Some(first));
    if from_image && occurrences == 1 {
        return None;
    }
    Some(first.to_string())
}

/// The one non-empty value of `key` the runner set, if any. Refuses a value
/// set twice differently, and one that only the image's ENV could have set.
pub fn single_value<'a>(
    container_env: &'a [String],
    image_env: &[String],
    key: &'static str,
) -> Result<Option<&'a str>, Unclear> {
    let mut values = values_of(container_env, key);
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.any(|v| v != first) {
        return Err(Unclear::Conflicting(key));
    }
    if first.is_empty() {
        return Ok(None);
    }
    if values_of(image_env, key).any(|v| v == first) {
        return Err(Unclear::FromImage(key));
    }
    Ok(Some(first))
}

fn values_of<'a>(env: &'a [String], key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    env.iter().filter_map(move |kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
    })
}

/// Whether the runner asked for a role for `c`: one `IAM_ROLE`, not empty
/// and not only the image's. Only then does the job's ID token matter, and
/// only then is it verified.
pub fn asks_for_role(c: &Container) -> bool {
    matches!(single_value(&c.env, &c.image_env, "IAM_ROLE"), Ok(Some(_)))
}

/// The session name (and SourceIdentity) of a job: `gitlab-job-<id>`.
pub fn job_session_name(job: &str) -> String {
    format!("gitlab-job-{job}")
}

/// RoleSessionName for a container's AssumeRole: `gitlab-job-<id>` from
/// gitlab-runner's label, else `container-<short id>`, cleaned to STS's
/// rules.
pub fn session_name(c: &Container) -> String {
    clean_session_name(&match c.job_id() {
        Some(job) => job_session_name(job),
        None => format!("container-{}", c.id.short()),
    })
}

/// Cleans a session name to STS's rules: 2-64 characters of `[\w+=,.@-]`.
pub fn clean_session_name(raw: &str) -> String {
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    while name.len() < 2 {
        name.push('-');
    }
    name
}
