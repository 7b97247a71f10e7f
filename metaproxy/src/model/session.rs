//! Session tags and SourceIdentity from the job: chosen values from
//! gitlab-runner's labels and predefined variables passed to AssumeRole, so
//! CloudTrail shows the job on every call made with the credentials and
//! IAM policies can test `aws:PrincipalTag/...`.
//!
//! Only what the runner wrote counts, and only where it is unambiguous:
//!
//! * a label the image also carries is left out;
//! * a variable that only the image's `ENV` set is left out;
//! * a variable set more than once with different values is left out (a
//!   job's own variables come after the runner's predefined ones, but a
//!   fact that depends on that order is a guess, not a fact);
//! * `CI_PROJECT_PATH` and `CI_COMMIT_REF_PROTECTED` count only where
//!   `CI_PROJECT_ID` is the runner's `project.id` label: variables that do
//!   not belong to the labelled project say nothing about it;
//! * a tag value STS would not take as it is is left out, never altered:
//!   `deploy%prod` cleaned to `deploy_prod` would pass a condition written
//!   for the real `deploy_prod`.
//!
//! A job with the Docker socket can start a container with any labels and
//! variables it likes: that job is outside the model, as the README says.

use super::{
    container::Container,
    gitlab::{self, Fact},
};

impl Fact {
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
}

/// What to send with AssumeRole besides the role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionOptions {
    /// Tags to set: source and key. Empty: no tags.
    pub tags: Vec<(Fact, String)>,
    /// Mark the tags transitive (they follow role chaining).
    pub transitive: bool,
    /// Set SourceIdentity to the job (`gitlab-job-<id>`).
    pub source_identity: bool,
}

impl SessionOptions {
    /// Every source under its default key, or renamed by `renames`
    /// (`SOURCE=NAME`).
    pub fn all_tags(renames: &[String]) -> Result<Vec<(Fact, String)>, String> {
        let mut tags: Vec<(Fact, String)> = Fact::ALL
            .into_iter()
            .map(|s| (s, s.default_key().to_string()))
            .collect();
        for rename in renames {
            let (source, name) = rename
                .split_once('=')
                .ok_or_else(|| format!("{rename:?}: expected SOURCE=NAME"))?;
            let source = Fact::parse(source.trim()).ok_or_else(|| {
                format!(
                    "{source:?}: not a tag source (one of {})",
                    Fact::ALL.map(Fact::name).join(", ")
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
            .filter_map(|(source, key)| {
                let value = source.value(c)?;
                if !is_sts_tag_value(&value) {
                    // Never the value: it is the job's to choose, and may
                    // be anything.
                    tracing::warn!(
                        container_id = %c.id,
                        tag = %key,
                        "session tag left out: its value is not one STS takes as it is (characters outside letters, digits, spaces and _.:/=+-@, or over 256 characters)"
                    );
                    return None;
                }
                Some((key.clone(), value))
            })
            .filter(|(_, v)| !v.is_empty())
            .collect();
        let source_identity = options
            .source_identity
            .then(|| Fact::JobId.value(c))
            .flatten()
            .map(|job| gitlab::job_session_name(&job))
            .filter(|id| {
                let as_is = gitlab::clean_session_name(id) == *id;
                if !as_is {
                    tracing::warn!(container_id = %c.id, "source identity left out: the job id is not one STS takes as it is");
                }
                as_is
            });
        Self {
            tags,
            transitive: options.transitive,
            source_identity,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty() && self.source_identity.is_none()
    }
}

/// Whether STS takes `value` as a session tag value unchanged: at most 256
/// letters, digits, spaces and `_.:/=+-@`.
fn is_sts_tag_value(value: &str) -> bool {
    clean_tag(value, 256) == value
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
    use crate::model::ids::ContainerId;

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
            wire: Default::default(),
        }
    }

    fn all_tags() -> SessionOptions {
        SessionOptions {
            tags: SessionOptions::all_tags(&[]).unwrap(),
            ..Default::default()
        }
    }

    fn tags_of(c: &Container) -> HashMap<String, String> {
        Session::for_container(c, &all_tags())
            .tags
            .into_iter()
            .collect()
    }

    /// What `f` logs, as the daemon would print it.
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let out = buf.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn tags_come_from_the_runners_labels_and_variables() {
        let c = job(
            &[
                ("project.id", "42"),
                ("job.id", "7"),
                ("job.ref", "main"),
                ("pipeline.id", "9"),
                ("runner.id", "3"),
            ],
            &[
                "CI_PROJECT_ID=42",
                "CI_PROJECT_PATH=group/app",
                "CI_COMMIT_REF_PROTECTED=true",
                // A job repeating the runner's values changes nothing.
                "CI_PROJECT_PATH=group/app",
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
        assert_eq!(tags["gitlab-runner-id"], "3");
        assert_eq!(s.source_identity.as_deref(), Some("gitlab-job-7"));
        assert!(s.transitive);
    }

    #[test]
    fn a_project_variable_set_twice_differently_is_unknown_not_the_first() {
        // The old rule took the first occurrence, trusting an order this
        // daemon cannot check.
        let c = job(
            &[("project.id", "42")],
            &[
                "CI_PROJECT_ID=42",
                "CI_PROJECT_PATH=group/app",
                "CI_COMMIT_REF_PROTECTED=true",
                "CI_PROJECT_PATH=group/other",
                "CI_COMMIT_REF_PROTECTED=false",
            ],
            &[],
        );
        let tags = tags_of(&c);
        assert!(!tags.contains_key("gitlab-project-path"), "{tags:?}");
        assert!(!tags.contains_key("gitlab-ref-protected"), "{tags:?}");
        assert_eq!(Fact::Protected.value(&c), None);
        assert_eq!(tags["gitlab-project-id"], "42");
    }

    #[test]
    fn the_path_counts_only_where_ci_project_id_is_the_labelled_project() {
        let env = |id: &'static str| {
            vec![
                id,
                "CI_PROJECT_PATH=group/app",
                "CI_COMMIT_REF_PROTECTED=true",
            ]
        };
        for (labels, id, known) in [
            (&[("project.id", "42")][..], "CI_PROJECT_ID=42", true),
            // Another project's variables, or none, say nothing.
            (&[("project.id", "42")][..], "CI_PROJECT_ID=43", false),
            (&[("project.id", "42")][..], "OTHER=1", false),
            (&[][..], "CI_PROJECT_ID=42", false),
        ] {
            let c = job(labels, &env(id), &[]);
            let path = Fact::ProjectPath.value(&c);
            let protected = Fact::Protected.value(&c);
            assert_eq!(path.is_some(), known, "{labels:?} {id}: {path:?}");
            assert_eq!(protected.is_some(), known, "{labels:?} {id}");
        }
        // Two different CI_PROJECT_IDs: unknown, so the path is too.
        let c = job(
            &[("project.id", "42")],
            &[
                "CI_PROJECT_ID=42",
                "CI_PROJECT_ID=43",
                "CI_PROJECT_PATH=group/app",
            ],
            &[],
        );
        assert_eq!(Fact::ProjectPath.value(&c), None);
        // An image's CI_PROJECT_ID is not the runner's.
        let c = job(
            &[("project.id", "42")],
            &["CI_PROJECT_ID=42", "CI_PROJECT_PATH=group/app"],
            &["CI_PROJECT_ID=42"],
        );
        assert_eq!(Fact::ProjectPath.value(&c), None);
    }

    #[test]
    fn what_only_the_image_set_is_left_out() {
        let mut c = job(
            &[],
            &["CI_PROJECT_ID=1", "CI_PROJECT_PATH=evil/path"],
            &["CI_PROJECT_PATH=evil/path"],
        );
        c.image_labels
            .insert("com.gitlab.gitlab-runner.project.id".into(), "1".into());
        c.labels
            .insert("com.gitlab.gitlab-runner.project.id".into(), "1".into());
        let tags = tags_of(&c);
        assert!(!tags.contains_key("gitlab-project-path"), "{tags:?}");
        assert!(!tags.contains_key("gitlab-project-id"), "{tags:?}");
    }

    #[test]
    fn a_value_sts_would_not_take_as_it_is_is_left_out_never_altered() {
        // Cleaned, `deploy%prod` would be `deploy_prod` and pass a
        // condition written for the real `deploy_prod`.
        let c = job(
            &[
                ("job.ref", "deploy%prod"),
                ("pipeline.id", "9"),
                ("runner.id", &"r".repeat(257)),
            ],
            &[],
            &[],
        );
        let mut tags = HashMap::new();
        let log = logged(|| tags = tags_of(&c));
        assert!(!tags.contains_key("gitlab-ref"), "{tags:?}");
        assert!(!tags.contains_key("gitlab-runner-id"), "too long: {tags:?}");
        assert_eq!(tags["gitlab-pipeline-id"], "9");
        assert!(log.contains("session tag left out"), "{log}");
        assert!(log.contains("tag=gitlab-ref"), "the tag is named: {log}");
        assert!(!log.contains("deploy%prod"), "never the value: {log}");
        // What STS takes as it is goes through unchanged.
        let fine = job(&[("job.ref", "release/1.0 rc+2@x:y=z")], &[], &[]);
        assert_eq!(tags_of(&fine)["gitlab-ref"], "release/1.0 rc+2@x:y=z");
        assert_eq!(clean_tag(&"x".repeat(300), 256).len(), 256);
        // SourceIdentity likewise.
        let odd = job(&[("job.id", "7 8")], &[], &[]);
        let options = SessionOptions {
            source_identity: true,
            ..Default::default()
        };
        assert_eq!(Session::for_container(&odd, &options).source_identity, None);
    }

    #[test]
    fn renames_are_checked() {
        assert!(SessionOptions::all_tags(&["nope=x".into()]).is_err());
        assert!(SessionOptions::all_tags(&["ref=aws:ref".into()]).is_err());
        assert!(SessionOptions::all_tags(&["ref=a<b".into()]).is_err());
        assert!(SessionOptions::all_tags(&["ref".into()]).is_err());
    }
}
