//! Newtypes for values that would otherwise all be `String` or `u64` and
//! get mixed up: cgroup ids, container ids, account ids and role ARNs.
//! Each is checked once, where it enters the daemon.

use std::{fmt, str::FromStr, sync::Arc};

/// A cgroup v2 id: the inode of the cgroup's directory, as the kernel
/// probe records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupId(pub u64);

impl fmt::Display for CgroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Whether `s` can name a container: a Docker name or an id (full or
/// short), `[A-Za-z0-9_.-]+`. Anything else never reaches Docker.
pub fn is_container_ref(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// A full (64 hex digit) Docker container id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerId(Arc<str>);

impl ContainerId {
    /// Accepts exactly 64 lowercase or uppercase hex digits.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Self(s.to_ascii_lowercase().into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 12-character form `docker ps` shows.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A 12-digit AWS account id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AccountId(Arc<str>);

impl AccountId {
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())).then(|| Self(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An IAM role ARN, `arn:PARTITION:iam::ACCOUNT:role[/PATH]/NAME`, parsed
/// once. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RoleArn(Arc<RoleArnParts>);

#[derive(PartialEq, Eq, Hash)]
struct RoleArnParts {
    arn: String,
    partition_len: usize,
    account: AccountId,
    /// Byte range of the path (`/` or `/a/b/`) in `arn`.
    path: (usize, usize),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleArnError {
    #[error("{0:?} is not a role ARN (arn:aws:iam::ACCOUNT:role/NAME)")]
    NotRoleArn(String),
    #[error("{0:?} is not a valid role name (1-64 of letters, digits and +=,.@_-)")]
    BadName(String),
    #[error("{0:?} is not a valid role path")]
    BadPath(String),
}

impl RoleArn {
    /// Parses a full role ARN.
    pub fn parse(arn: &str) -> Result<Self, RoleArnError> {
        let not = || RoleArnError::NotRoleArn(arn.to_string());
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        let ["arn", partition, "iam", "", account, resource] = parts.as_slice() else {
            return Err(not());
        };
        if !matches!(
            *partition,
            "aws" | "aws-cn" | "aws-us-gov" | "aws-iso" | "aws-iso-b"
        ) && !partition.starts_with("aws-")
        {
            return Err(not());
        }
        let account = AccountId::parse(account).ok_or_else(not)?;
        let path_and_name = resource.strip_prefix("role").ok_or_else(not)?;
        if !path_and_name.starts_with('/') {
            return Err(not());
        }
        let (path, name) = path_and_name
            .rsplit_once('/')
            .map(|(p, n)| (&path_and_name[..p.len() + 1], n))
            .ok_or_else(not)?;
        check_name(name)?;
        check_path(path)?;
        let path_start = arn.len() - path_and_name.len();
        Ok(Self(Arc::new(RoleArnParts {
            arn: arn.to_string(),
            partition_len: partition.len(),
            account,
            path: (path_start, path_start + path.len()),
        })))
    }

    /// A role given by name (optionally with a path, `ci/deploy`), taken in
    /// `account` of the `aws` partition.
    pub fn from_name(name: &str, account: &AccountId) -> Result<Self, RoleArnError> {
        let (path, leaf) = match name.rsplit_once('/') {
            Some((p, leaf)) => (format!("/{}/", p.trim_matches('/')), leaf),
            None => ("/".to_string(), name),
        };
        check_name(leaf)?;
        check_path(&path)?;
        Self::parse(&format!("arn:aws:iam::{account}:role{path}{leaf}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0.arn
    }

    pub fn partition(&self) -> &str {
        &self.0.arn[4..4 + self.0.partition_len]
    }

    pub fn account(&self) -> &AccountId {
        &self.0.account
    }

    /// `/` or `/a/b/`.
    pub fn path(&self) -> &str {
        &self.0.arn[self.0.path.0..self.0.path.1]
    }

    /// The role's name: what IMDS lists under security-credentials/.
    pub fn name(&self) -> &str {
        &self.0.arn[self.0.path.1..]
    }
}

impl FromStr for RoleArn {
    type Err = RoleArnError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.arn)
    }
}

impl fmt::Debug for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoleArn({})", self.0.arn)
    }
}

fn is_iam_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)
}

fn check_name(name: &str) -> Result<(), RoleArnError> {
    if (1..=64).contains(&name.len()) && name.chars().all(is_iam_char) {
        Ok(())
    } else {
        Err(RoleArnError::BadName(name.to_string()))
    }
}

fn check_path(path: &str) -> Result<(), RoleArnError> {
    let ok = path.len() <= 512
        && path.starts_with('/')
        && path.ends_with('/')
        && !path.contains("//")
        && path.chars().all(|c| c == '/' || is_iam_char(c));
    if ok {
        Ok(())
    } else {
        Err(RoleArnError::BadPath(path.to_string()))
    }
}

/// STS's rule for ExternalId: 2-1224 characters of `[\w+=,.@:/-]`.
pub fn valid_external_id(id: &str) -> bool {
    (2..=1224).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@:/-".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_arns_parse_once_into_their_parts() {
        let a = RoleArn::parse("arn:aws:iam::123456789012:role/ci/deploy/prod").unwrap();
        assert_eq!(a.partition(), "aws");
        assert_eq!(a.account().as_str(), "123456789012");
        assert_eq!(a.path(), "/ci/deploy/");
        assert_eq!(a.name(), "prod");
        let b = RoleArn::parse("arn:aws-cn:iam::123456789012:role/x").unwrap();
        assert_eq!((b.partition(), b.path(), b.name()), ("aws-cn", "/", "x"));
        for bad in [
            "arn:aws:s3:::bucket",
            "arn:aws:iam::12345678901:role/x",
            "arn:aws:iam::123456789012:user/x",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:iam::123456789012:role//x",
            "arn:aws:iam::123456789012:rolex",
            "arn:aws:iam::123456789012:role/bad name",
            "arn:gcp:iam::123456789012:role/x",
            "deploy",
        ] {
            assert!(RoleArn::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_taken_in_the_given_account() {
        let acct = AccountId::parse("123456789012").unwrap();
        assert_eq!(
            RoleArn::from_name("deploy", &acct).unwrap().as_str(),
            "arn:aws:iam::123456789012:role/deploy"
        );
        let p = RoleArn::from_name("ci/deploy", &acct).unwrap();
        assert_eq!((p.path(), p.name()), ("/ci/", "deploy"));
        assert!(RoleArn::from_name("bad name", &acct).is_err());
        assert!(RoleArn::from_name(&"x".repeat(65), &acct).is_err());
    }

    #[test]
    fn container_and_account_ids_are_checked() {
        let id = "A".repeat(64);
        assert_eq!(ContainerId::parse(&id).unwrap().as_str(), "a".repeat(64));
        assert_eq!(ContainerId::parse(&id).unwrap().short(), "a".repeat(12));
        assert!(ContainerId::parse("abc").is_none());
        assert!(ContainerId::parse(&"g".repeat(64)).is_none());
        assert!(AccountId::parse("12345678901a").is_none());
    }
}
