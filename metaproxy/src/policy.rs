//! Which role, if any, a container may have. The runner chooses roles (its
//! `[runners.docker] environment` sets IAM_ROLE); image authors and job
//! authors must not. There is no default role.

use globset::{Glob, GlobSet, GlobSetBuilder};

/// A role a container may assume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub arn: String,
    pub external_id: Option<String>,
}

impl Role {
    /// The role's name: what IMDS lists under security-credentials/.
    pub fn name(&self) -> &str {
        self.arn.rsplit('/').next().unwrap_or(&self.arn)
    }

    /// The account the role lives in.
    pub fn account(&self) -> &str {
        self.arn.split(':').nth(4).unwrap_or("")
    }
}

/// The verdict for one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleDecision {
    /// No IAM_ROLE (or an empty one): the container gets no credentials.
    NoRole,
    Role(Role),
    /// A role was asked for and refused, with the reason.
    Refused(String),
}

#[derive(Debug, thiserror::Error)]
#[error("--allow-role {pattern}: {source}")]
pub struct PatternError {
    pattern: String,
    source: globset::Error,
}

/// The role policy: `--allow-role` globs, or the instance's own account.
#[derive(Debug, Clone)]
pub struct Policy {
    allow: Option<GlobSet>,
}

impl Policy {
    pub fn new(patterns: &[String]) -> Result<Self, PatternError> {
        if patterns.is_empty() {
            return Ok(Self { allow: None });
        }
        let mut set = GlobSetBuilder::new();
        for p in patterns {
            set.add(Glob::new(p).map_err(|source| PatternError {
                pattern: p.clone(),
                source,
            })?);
        }
        let allow = set.build().map_err(|source| PatternError {
            pattern: patterns.join(","),
            source,
        })?;
        Ok(Self { allow: Some(allow) })
    }

    /// Decides from the container's environment (`Config.Env`, which already
    /// includes the image's), the image's own environment, and the instance
    /// profile's account (if known yet).
    pub fn decide(
        &self,
        container_env: &[String],
        image_env: &[String],
        account: Option<&str>,
    ) -> RoleDecision {
        let role = match single_value(container_env, image_env, "IAM_ROLE") {
            Ok(None) => return RoleDecision::NoRole,
            Ok(Some(v)) => v,
            Err(reason) => return RoleDecision::Refused(reason),
        };
        let external_id = match single_value(container_env, image_env, "IAM_EXTERNAL_ID") {
            Ok(v) => v.map(str::to_owned),
            Err(reason) => return RoleDecision::Refused(reason),
        };
        let arn = if role.starts_with("arn:") {
            if !valid_role_arn(role) {
                return RoleDecision::Refused(format!("IAM_ROLE {role:?} is not a role ARN"));
            }
            role.to_string()
        } else {
            if !valid_role_name(role) {
                return RoleDecision::Refused(format!(
                    "IAM_ROLE {role:?} is not a valid role name"
                ));
            }
            match account {
                Some(account) => format!("arn:aws:iam::{account}:role/{role}"),
                None => {
                    return RoleDecision::Refused(
                        "the instance profile's account is not known yet".into(),
                    )
                }
            }
        };
        let role = Role { arn, external_id };
        let allowed = match (&self.allow, account) {
            (Some(set), _) => set.is_match(&role.arn),
            (None, Some(account)) => role.account() == account,
            (None, None) => false,
        };
        if !allowed {
            let rule = if self.allow.is_some() {
                "--allow-role"
            } else {
                "the instance profile's account"
            };
            return RoleDecision::Refused(format!("{} is not allowed by {rule}", role.arn));
        }
        RoleDecision::Role(role)
    }
}

/// The one non-empty value of `key` the runner set, if any. Refuses a value
/// set twice differently, and one that only the image's ENV could have set.
fn single_value<'a>(
    container_env: &'a [String],
    image_env: &[String],
    key: &'a str,
) -> Result<Option<&'a str>, String> {
    let values: Vec<&str> = values_of(container_env, key).collect();
    let Some(&first) = values.last() else {
        return Ok(None);
    };
    if values.iter().any(|v| *v != first) {
        return Err(format!("{key} is set more than once with different values"));
    }
    if first.is_empty() {
        return Ok(None);
    }
    if values_of(image_env, key).any(|v| v == first) {
        return Err(format!(
            "{key} comes from the image's ENV; only the runner may set it"
        ));
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

fn valid_role_name(name: &str) -> bool {
    // IAM: names are 1-64 of [\w+=,.@-]; paths add '/'.
    let leaf = name.rsplit('/').next().unwrap_or("");
    (1..=64).contains(&leaf.len())
        && name.len() <= 512
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-/".contains(c))
}

fn valid_role_arn(arn: &str) -> bool {
    // arn:PARTITION:iam::ACCOUNT:role/[PATH/]NAME
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    matches!(parts.as_slice(), ["arn", partition, "iam", "", account, resource]
        if partition.starts_with("aws")
            && account.len() == 12
            && account.bytes().all(|b| b.is_ascii_digit())
            && resource.strip_prefix("role/").is_some_and(valid_role_name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCT: Option<&str> = Some("123456789012");

    fn env(kvs: &[&str]) -> Vec<String> {
        kvs.iter().map(|s| s.to_string()).collect()
    }

    fn role(arn: &str) -> RoleDecision {
        RoleDecision::Role(Role {
            arn: arn.into(),
            external_id: None,
        })
    }

    #[test]
    fn names_and_arns() {
        let p = Policy::new(&[]).unwrap();
        assert_eq!(
            p.decide(&env(&["IAM_ROLE=deploy"]), &[], ACCT),
            role("arn:aws:iam::123456789012:role/deploy")
        );
        assert_eq!(
            p.decide(
                &env(&["IAM_ROLE=arn:aws:iam::123456789012:role/ci/deploy"]),
                &[],
                ACCT
            ),
            role("arn:aws:iam::123456789012:role/ci/deploy")
        );
        let RoleDecision::Role(r) = p.decide(&env(&["IAM_ROLE=ci/deploy"]), &[], ACCT) else {
            panic!()
        };
        assert_eq!(r.name(), "deploy");
    }

    #[test]
    fn no_role_unless_the_runner_sets_one() {
        let p = Policy::new(&[]).unwrap();
        assert_eq!(
            p.decide(&env(&["PATH=/bin"]), &[], ACCT),
            RoleDecision::NoRole
        );
        assert_eq!(
            p.decide(&env(&["IAM_ROLE="]), &[], ACCT),
            RoleDecision::NoRole
        );
        // The image's ENV shows up in Config.Env too; it must not count.
        let from_image = p.decide(&env(&["IAM_ROLE=admin"]), &env(&["IAM_ROLE=admin"]), ACCT);
        assert!(matches!(from_image, RoleDecision::Refused(r) if r.contains("image")));
        // The runner overriding the image's value is the runner's choice.
        assert_eq!(
            p.decide(&env(&["IAM_ROLE=deploy"]), &env(&["IAM_ROLE=admin"]), ACCT),
            role("arn:aws:iam::123456789012:role/deploy")
        );
        // ... and so is the runner clearing it.
        assert_eq!(
            p.decide(&env(&["IAM_ROLE="]), &env(&["IAM_ROLE=admin"]), ACCT),
            RoleDecision::NoRole
        );
    }

    #[test]
    fn conflicting_or_malformed_values_are_refused() {
        let p = Policy::new(&[]).unwrap();
        assert!(matches!(
            p.decide(&env(&["IAM_ROLE=a", "IAM_ROLE=b"]), &[], ACCT),
            RoleDecision::Refused(_)
        ));
        assert_eq!(
            p.decide(&env(&["IAM_ROLE=a", "IAM_ROLE=a"]), &[], ACCT),
            role("arn:aws:iam::123456789012:role/a")
        );
        assert!(matches!(
            p.decide(&env(&["IAM_ROLE=arn:aws:s3:::bucket"]), &[], ACCT),
            RoleDecision::Refused(_)
        ));
        assert!(matches!(
            p.decide(&env(&["IAM_ROLE=bad name"]), &[], ACCT),
            RoleDecision::Refused(_)
        ));
        assert!(matches!(
            p.decide(
                &env(&["IAM_ROLE=x", "IAM_EXTERNAL_ID=1", "IAM_EXTERNAL_ID=2"]),
                &[],
                ACCT
            ),
            RoleDecision::Refused(_)
        ));
    }

    #[test]
    fn allow_list_and_default_account_rule() {
        let p = Policy::new(&[]).unwrap();
        let other = p.decide(
            &env(&["IAM_ROLE=arn:aws:iam::999999999999:role/x"]),
            &[],
            ACCT,
        );
        assert!(matches!(other, RoleDecision::Refused(r) if r.contains("account")));
        assert!(matches!(
            p.decide(&env(&["IAM_ROLE=x"]), &[], None),
            RoleDecision::Refused(_)
        ));

        let p = Policy::new(&["arn:aws:iam::*:role/ci-*".into()]).unwrap();
        assert_eq!(
            p.decide(
                &env(&["IAM_ROLE=arn:aws:iam::999999999999:role/ci-build"]),
                &[],
                ACCT
            ),
            role("arn:aws:iam::999999999999:role/ci-build")
        );
        assert!(
            matches!(p.decide(&env(&["IAM_ROLE=admin"]), &[], ACCT), RoleDecision::Refused(r) if r.contains("--allow-role"))
        );
        let with_ext = p.decide(&env(&["IAM_ROLE=ci-x", "IAM_EXTERNAL_ID=abc"]), &[], ACCT);
        assert_eq!(
            with_ext,
            RoleDecision::Role(Role {
                arn: "arn:aws:iam::123456789012:role/ci-x".into(),
                external_id: Some("abc".into())
            })
        );
        assert!(Policy::new(&["[".into()]).is_err());
    }
}
