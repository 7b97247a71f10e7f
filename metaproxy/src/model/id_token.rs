//! A job's GitLab ID token (`id_tokens:` in `.gitlab-ci.yml`), once
//! verified: the JWT itself, kept as a secret, and the claims GitLab signed.
//!
//! Unlike labels and variables, no job can forge these: they come from the
//! GitLab instance, under its signature. [`crate::identity::id_token`]
//! verifies a token before anything reads its claims; this module only
//! says what a verified token holds and why one was refused.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::Deserialize;

use super::secret::Secret;

/// The claims of a GitLab ID token that metaproxy uses. GitLab writes ids
/// as strings (`"job_id": "302"`), except `runner_id`, a number; both forms
/// are taken for every id.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
    #[serde(default)]
    pub nbf: Option<u64>,
    #[serde(deserialize_with = "id")]
    pub job_id: String,
    #[serde(deserialize_with = "id")]
    pub project_id: String,
    pub project_path: String,
    #[serde(default)]
    pub namespace_path: Option<String>,
    #[serde(default, deserialize_with = "optional_id")]
    pub pipeline_id: Option<String>,
    #[serde(rename = "ref")]
    pub git_ref: String,
    #[serde(default)]
    pub ref_type: Option<String>,
    #[serde(deserialize_with = "flag")]
    pub ref_protected: bool,
    #[serde(default)]
    pub environment: Option<String>,
    #[serde(default, deserialize_with = "optional_flag")]
    pub environment_protected: Option<bool>,
    /// GitLab's numeric id of the runner (not the short token of the
    /// runner's `runner.id` label).
    #[serde(default, deserialize_with = "optional_id")]
    pub runner_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Id {
    Text(String),
    Number(u64),
}

impl From<Id> for String {
    fn from(id: Id) -> Self {
        match id {
            Id::Text(s) => s,
            Id::Number(n) => n.to_string(),
        }
    }
}

fn id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Id::deserialize(d).map(String::from)
}

fn optional_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<Id>::deserialize(d).map(|id| id.map(String::from))
}

/// GitLab's booleans are the strings `"true"` and `"false"`.
fn flag<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Flag {
        Text(String),
        Bool(bool),
    }
    match Flag::deserialize(d)? {
        Flag::Bool(b) => Ok(b),
        Flag::Text(s) if s == "true" => Ok(true),
        Flag::Text(s) if s == "false" => Ok(false),
        Flag::Text(_) => Err(serde::de::Error::custom("expected \"true\" or \"false\"")),
    }
}

fn optional_flag<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    #[derive(Deserialize)]
    struct Wrap(#[serde(deserialize_with = "flag")] bool);
    Option::<Wrap>::deserialize(d).map(|w| w.map(|w| w.0))
}

/// A verified ID token: the JWT (a secret: it buys the job's role from
/// STS) and its claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdToken {
    pub raw: Secret,
    pub claims: Claims,
}

impl IdToken {
    /// When the token stops being valid: its `exp`.
    pub fn expires(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.claims.exp)
    }
}

/// What a container's ID token came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenState {
    /// No token: `--oidc-issuer` is not set, or the container has none.
    Absent,
    Verified(Arc<IdToken>),
    /// A token was there and failed a check: the container gets nothing,
    /// and never falls back to the instance profile.
    Refused(TokenRefusal),
}

/// Why a container's ID token was refused. Nothing here quotes the token;
/// values from it are the job's to choose and are shortened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("{0} is set more than once with different values")]
    Conflicting(&'static str),
    #[error("{0} comes from the image's ENV; only GitLab may set it")]
    FromImage(&'static str),
    #[error("the ID token in {variable} is not a JWT: {why}")]
    Malformed { variable: &'static str, why: String },
    #[error("the ID token is signed with {0}; only RS256/384/512, PS256/384/512 and ES256/384 are taken")]
    Algorithm(String),
    #[error("the ID token names no signing key (kid)")]
    NoKeyId,
    #[error("the ID token is signed by key {kid:?}, which is not in the issuer's JWKS")]
    UnknownKey { kid: String },
    #[error("the ID token's signature does not verify against the issuer's key {kid:?}")]
    Signature { kid: String },
    #[error("the ID token expired at {at} (a token lives as long as its job's timeout)")]
    Expired { at: String },
    #[error("the ID token is not valid before {at}")]
    NotYetValid { at: String },
    #[error("the ID token was issued in the future ({at})")]
    IssuedInFuture { at: String },
    #[error("the ID token is from issuer {found:?}, not {expected}")]
    Issuer { found: String, expected: String },
    #[error("the ID token's audience is not {expected}")]
    Audience { expected: String },
    #[error("the ID token lacks a claim or has a malformed one: {0}")]
    Claims(String),
    #[error("the ID token is for job {claim}, but this container belongs to job {label}")]
    OtherJob { claim: String, label: String },
    #[error("the container has no com.gitlab.gitlab-runner.job.id label of the runner's own to match the ID token's job_id")]
    NoJobLabel,
    #[error("the issuer's keys cannot be fetched: {0}")]
    IssuerUnavailable(String),
    #[error("--oidc-required: the container has no ID token in {0} (add id_tokens: to the job)")]
    Required(&'static str),
}

/// At most `max` characters of a value a job chose, for a reason.
pub fn shorten(value: &str, max: usize) -> String {
    let mut out: String = value.chars().take(max).collect();
    if value.chars().count() > max {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(extra: serde_json::Value) -> serde_json::Value {
        let mut c = serde_json::json!({
            "iss": "https://gitlab.example.com",
            "sub": "project_path:group/app:ref_type:branch:ref:main",
            "aud": "sts.amazonaws.com",
            "exp": 2000, "iat": 1000, "nbf": 995,
            "job_id": "302", "project_id": "20", "project_path": "group/app",
            "namespace_path": "group", "pipeline_id": "574",
            "ref": "main", "ref_type": "branch", "ref_protected": "true",
            "runner_id": 1,
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    #[test]
    fn gitlab_claims_parse_as_gitlab_writes_them() {
        let c: Claims = serde_json::from_value(claims(serde_json::json!({
            "environment": "production", "environment_protected": "false",
        })))
        .unwrap();
        assert_eq!(c.job_id, "302");
        assert_eq!(c.runner_id.as_deref(), Some("1"));
        assert!(c.ref_protected);
        assert_eq!(c.environment.as_deref(), Some("production"));
        assert_eq!(c.environment_protected, Some(false));
        // Numbers for ids, real booleans: taken too.
        let c: Claims = serde_json::from_value(claims(
            serde_json::json!({"job_id": 302, "ref_protected": false}),
        ))
        .unwrap();
        assert_eq!(c.job_id, "302");
        assert!(!c.ref_protected);
    }

    #[test]
    fn a_token_without_the_claims_that_decide_is_not_taken() {
        for missing in ["job_id", "project_path", "ref", "ref_protected", "iat"] {
            let mut c = claims(serde_json::json!({}));
            c.as_object_mut().unwrap().remove(missing);
            assert!(
                serde_json::from_value::<Claims>(c).is_err(),
                "{missing} missing"
            );
        }
        let c = claims(serde_json::json!({"ref_protected": "yes"}));
        assert!(serde_json::from_value::<Claims>(c).is_err());
    }

    #[test]
    fn a_token_never_prints() {
        let t = IdToken {
            raw: Secret::new("eyJhbGciOi.secret-part.sig".into()),
            claims: serde_json::from_value(claims(serde_json::json!({}))).unwrap(),
        };
        let printed = format!("{t:?}");
        assert!(!printed.contains("secret-part"), "{printed}");
        assert!(printed.contains("group/app"));
    }
}
