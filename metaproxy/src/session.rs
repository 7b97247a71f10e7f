//! Session tags and SourceIdentity from the job: chosen values from
//! gitlab-runner's labels and predefined variables passed to AssumeRole, so
//! CloudTrail shows the job on every call made with the credentials and
//! IAM policies can test `aws:PrincipalTag/...`.
//!
//! Only what the runner wrote counts: a label the image also carries, or a
//! variable that only the image's `ENV` set, is left out (a job's own
//! variables come after the runner's predefined ones, so the first
//! occurrence is the runner's). A job with the Docker socket can start a
//! container with any labels and variables it likes: that job is outside
//! the model, as the README says.

use crate::identity::Container;

/// Where a tag's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TagSource {
    ProjectId,
    ProjectPath,
    PipelineId,
    JobId,
    Ref,
    Protected,
    RunnerId,
}

impl TagSource {
    pub const ALL: [TagSource; 7] = [
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

    /// The tag key unless renamed.
    pub fn default_key(self) -> &'static str {
        match self {
            Self::ProjectId => "gitlab-project-id",
            Self::ProjectPath => "gitlab-project-path",
            Self::PipelineId => "gitlab-pipeline-id",
            Self::JobId => "gitlab-job-id",
            Self::Ref => "gitlab-ref",
            Self::Protected => "gitlab-ref-protected",
            Self::RunnerId => "gitlab-runner-id",
        }
    }

    /// The value the runner set for this container, if any.
    pub(crate) fn value(self, c: &Container) -> Option<String> {
        let label = |key: &str| {
            let key = format!("com.gitlab.gitlab-runner.{key}");
            // The runner's label, not one the image brought.
            c.labels
                .get(&key)
                .filter(|_| !c.image_labels.contains_key(&key))
                .cloned()
        };
        match self {
            Self::ProjectId => label("project.id"),
            Self::PipelineId => label("pipeline.id"),
            Self::JobId => label("job.id"),
            Self::Ref => label("job.ref"),
            Self::RunnerId => label("runner.id"),
            Self::ProjectPath => runner_variable(c, "CI_PROJECT_PATH"),
            Self::Protected => runner_variable(c, "CI_COMMIT_REF_PROTECTED"),
        }
    }
}

/// The first occurrence of `key` in the container's environment (the
/// runner's predefined variables come before the job's own), unless only
/// the image's `ENV` set it.
fn runner_variable(c: &Container, key: &str) -> Option<String> {
    let prefix = format!("{key}=");
    let first = c.env.iter().find_map(|e| e.strip_prefix(&prefix))?;
    let occurrences = c.env.iter().filter(|e| e.starts_with(&prefix)).count();
    let from_image = c
        .image_env
        .iter()
        .any(|e| e.strip_prefix(&prefix) == Some(first));
    if from_image && occurrences == 1 {
        return None;
    }
    Some(first.to_string())
}

/// What to send with AssumeRole besides the role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionOptions {
    /// Tags to set: source and key. Empty: no tags.
    pub tags: Vec<(TagSource, String)>,
    /// Mark the tags transitive (they follow role chaining).
    pub transitive: bool,
    /// Set SourceIdentity to the job (`gitlab-job-<id>`).
    pub source_identity: bool,
}

impl SessionOptions {
    /// Every source under its default key, or renamed by `renames`
    /// (`SOURCE=NAME`).
    pub fn all_tags(renames: &[String]) -> Result<Vec<(TagSource, String)>, String> {
        let mut tags: Vec<(TagSource, String)> = TagSource::ALL
            .into_iter()
            .map(|s| (s, s.default_key().to_string()))
            .collect();
        for rename in renames {
            let (source, name) = rename
                .split_once('=')
                .ok_or_else(|| format!("{rename:?}: expected SOURCE=NAME"))?;
            let source = TagSource::parse(source.trim()).ok_or_else(|| {
                format!(
                    "{source:?}: not a tag source (one of {})",
                    TagSource::ALL.map(TagSource::name).join(", ")
                )
            })?;
            let name = name.trim();
            if name.is_empty()
                || clean_tag(name, 128) != name
                || name.to_ascii_lowercase().starts_with("aws:")
            {
                return Err(format!(
                    "{name:?}: tag keys are 1-128 letters, digits, spaces and _.:/=+-@, not starting with aws:"
                ));
            }
            for tag in &mut tags {
                if tag.0 == source {
                    tag.1 = name.to_string();
                }
            }
        }
        Ok(tags)
    }
}

/// The session's tags and SourceIdentity for container `c`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Session {
    pub tags: Vec<(String, String)>,
    pub transitive: bool,
    pub source_identity: Option<String>,
}

impl Session {
    pub fn for_container(c: &Container, options: &SessionOptions) -> Self {
        let tags = options
            .tags
            .iter()
            .filter_map(|(source, key)| Some((key.clone(), clean_tag(&source.value(c)?, 256))))
            .filter(|(_, v)| !v.is_empty())
            .collect();
        Self {
            tags,
            transitive: options.transitive,
            source_identity: options
                .source_identity
                .then(|| TagSource::JobId.value(c))
                .flatten()
                .map(|job| crate::policy::clean_session_name(&format!("gitlab-job-{job}"))),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty() && self.source_identity.is_none()
    }
}

/// A tag key or value cleaned to STS's rules: letters, digits, spaces and
/// `_.:/=+-@`, at most `max` characters; anything else becomes `_`.
pub fn clean_tag(raw: &str, max: usize) -> String {
    raw.chars()
        .map(|c| {
            if c.is_alphanumeric() || c == ' ' || "_.:/=+-@".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(max)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::ids::ContainerId;

    fn job(labels: &[(&str, &str)], env: &[&str], image_env: &[&str]) -> Container {
        Container {
            id: ContainerId::parse(&"a".repeat(64)).unwrap(),
            name: "job".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (format!("com.gitlab.gitlab-runner.{k}"), v.to_string()))
                .collect(),
            env: env.iter().map(|s| s.to_string()).collect(),
            image_env: image_env.iter().map(|s| s.to_string()).collect(),
            image_labels: HashMap::new(),
            addresses: None,
            cgroup: None,
        }
    }

    #[test]
    fn tags_come_from_the_runners_labels_and_first_variables() {
        let c = job(
            &[
                ("project.id", "42"),
                ("job.id", "7"),
                ("job.ref", "main"),
                ("pipeline.id", "9"),
                ("runner.id", "3"),
            ],
            &[
                "CI_PROJECT_PATH=group/app",
                "CI_COMMIT_REF_PROTECTED=true",
                // The job's own variables come after the runner's.
                "CI_PROJECT_PATH=group/other",
                "CI_COMMIT_REF_PROTECTED=false",
            ],
            &[],
        );
        let options = SessionOptions {
            tags: SessionOptions::all_tags(&["ref=Branch".into()]).unwrap(),
            transitive: true,
            source_identity: true,
        };
        let s = Session::for_container(&c, &options);
        let tags: HashMap<_, _> = s.tags.iter().cloned().collect();
        assert_eq!(tags["gitlab-project-id"], "42");
        assert_eq!(tags["gitlab-project-path"], "group/app");
        assert_eq!(tags["gitlab-ref-protected"], "true");
        assert_eq!(tags["Branch"], "main");
        assert_eq!(tags["gitlab-job-id"], "7");
        assert_eq!(s.source_identity.as_deref(), Some("gitlab-job-7"));
        assert!(s.transitive);
    }

    #[test]
    fn what_only_the_image_set_is_left_out_and_values_are_cleaned() {
        let mut c = job(
            &[("job.ref", "feature/<script>\u{7}")],
            &["CI_PROJECT_PATH=evil/path"],
            &["CI_PROJECT_PATH=evil/path"],
        );
        c.image_labels
            .insert("com.gitlab.gitlab-runner.project.id".into(), "1".into());
        c.labels
            .insert("com.gitlab.gitlab-runner.project.id".into(), "1".into());
        let options = SessionOptions {
            tags: SessionOptions::all_tags(&[]).unwrap(),
            ..Default::default()
        };
        let tags: HashMap<_, _> = Session::for_container(&c, &options)
            .tags
            .into_iter()
            .collect();
        assert!(!tags.contains_key("gitlab-project-path"), "{tags:?}");
        assert!(!tags.contains_key("gitlab-project-id"), "{tags:?}");
        assert_eq!(tags["gitlab-ref"], "feature/_script__");
        assert_eq!(clean_tag(&"x".repeat(300), 256).len(), 256);
    }

    #[test]
    fn renames_are_checked() {
        assert!(SessionOptions::all_tags(&["nope=x".into()]).is_err());
        assert!(SessionOptions::all_tags(&["ref=aws:ref".into()]).is_err());
        assert!(SessionOptions::all_tags(&["ref=a<b".into()]).is_err());
        assert!(SessionOptions::all_tags(&["ref".into()]).is_err());
    }
}
