//! The decision for a job with a GitLab ID token: assumed with it, its
//! claims as the policy file's facts, and never a fallback.

use super::tests::{container, policy};
use super::*;

/// A verified token of job 7 with these claims over the defaults.
fn token(extra: serde_json::Value) -> TokenState {
    let mut claims = serde_json::json!({
        "iss": "https://gitlab.example.com", "sub": "project_path:group/app:ref_type:branch:ref:main",
        "exp": 4_000_000_000u64, "iat": 1, "job_id": "7", "project_id": "20",
        "project_path": "group/app", "ref": "main", "ref_type": "branch",
        "ref_protected": "true",
    });
    for (k, v) in extra.as_object().unwrap() {
        claims[k] = v.clone();
    }
    TokenState::Verified(Arc::new(IdToken {
        raw: crate::model::secret::Secret::new("header.payload.signature".into()),
        claims: serde_json::from_value(claims).unwrap(),
    }))
}

#[test]
fn a_verified_token_assumes_the_runners_role_with_web_identity_as_its_job() {
    let p = policy(&["arn:aws:iam::123456789012:role/*"]);
    let c = container(&["IAM_ROLE=deploy", "IAM_EXTERNAL_ID=ext-123"], &[]);
    let RoleDecision::Role(r) = p.decide_for(&c, &token(serde_json::json!({}))) else {
        panic!("no role");
    };
    assert_eq!(r.arn.as_str(), "arn:aws:iam::123456789012:role/deploy");
    assert_eq!(r.session_name, "gitlab-job-7");
    assert_eq!(r.source(), "web-identity");
    // AssumeRoleWithWebIdentity takes neither.
    assert_eq!(r.external_id, None);
    assert!(r.session.is_empty());
    // No IAM_ROLE from the runner: still no role, token or not.
    assert_eq!(
        p.decide_for(&container(&[], &[]), &token(serde_json::json!({}))),
        RoleDecision::NoRole
    );
    // --allow-role still applies.
    let narrow = policy(&["arn:aws:iam::123456789012:role/read-*"]);
    assert!(matches!(
        narrow.decide_for(&c, &token(serde_json::json!({}))),
        RoleDecision::Refused(RoleRefusal::NotAllowed { .. })
    ));
}

#[test]
fn a_refused_token_never_falls_back_to_the_instance_profile() {
    let p = policy(&["arn:aws:iam::123456789012:role/*"]);
    let c = Arc::new(container(&["IAM_ROLE=deploy"], &[]));
    let expired = TokenState::Refused(TokenRefusal::Expired { at: "then".into() });
    assert_eq!(
        *p.decision(&c, &expired),
        RoleDecision::Refused(RoleRefusal::IdToken(TokenRefusal::Expired {
            at: "then".into()
        }))
    );
    // Without --oidc-required a job with no token is assumed as before;
    // with it, it gets nothing.
    assert!(matches!(
        *p.decision(&c, &TokenState::Absent),
        RoleDecision::Role(Role { id_token: None, .. })
    ));
    let required =
        policy(&["arn:aws:iam::123456789012:role/*"]).with_token_required("AWS_ID_TOKEN");
    assert_eq!(
        required.decide_for(&c, &TokenState::Absent),
        RoleDecision::Refused(RoleRefusal::IdToken(TokenRefusal::Required("AWS_ID_TOKEN")))
    );
    assert!(matches!(
        required.decide_for(&c, &token(serde_json::json!({}))),
        RoleDecision::Role(_)
    ));
}

#[test]
fn with_a_token_the_policy_file_decides_on_its_claims_not_the_jobs_variables() {
    let p = policy(&["arn:aws:iam::123456789012:role/*"]);
    p.set_file(Some(
        PolicyFile::parse(
            "policy.toml",
            r#"
[[rule]]
roles = ["arn:aws:iam::123456789012:role/deploy"]
projects = ["group/app"]
refs = ["main"]
protected = true
environments = ["production"]
environment_protected = true
ref_type = "branch"
"#,
        )
        .unwrap(),
    ));
    // The job forges the runner's facts beside a token of another project.
    let mut c = container(
        &[
            "IAM_ROLE=deploy",
            "CI_PROJECT_ID=20",
            "CI_PROJECT_PATH=group/app",
            "CI_COMMIT_REF_PROTECTED=true",
        ],
        &[],
    );
    c.labels.insert(gitlab::label("project.id"), "20".into());
    c.labels.insert(gitlab::label("job.ref"), "main".into());
    let production =
        serde_json::json!({"environment": "production", "environment_protected": "true"});
    let mut elsewhere = production.clone();
    elsewhere["project_path"] = "group/other".into();
    let refused = p.decide_for(&c, &token(elsewhere));
    assert!(
        matches!(&refused, RoleDecision::Refused(RoleRefusal::PolicyFile(_))),
        "{refused:?}"
    );
    assert!(refused.to_string_for_test().contains("group/other"));
    assert!(matches!(
        p.decide_for(&c, &token(production.clone())),
        RoleDecision::Role(_)
    ));
    // Each claim counts: an unprotected environment, an unprotected ref,
    // another environment, a tag.
    for (k, v) in [
        ("environment_protected", "false"),
        ("ref_protected", "false"),
        ("environment", "staging"),
        ("ref_type", "tag"),
    ] {
        let mut claims = production.clone();
        claims[k] = v.into();
        assert!(
            matches!(p.decide_for(&c, &token(claims)), RoleDecision::Refused(_)),
            "{k}={v}"
        );
    }
    // Without a token the environment rules match nothing: the labels and
    // variables cannot say.
    assert!(matches!(
        p.decide_for(&c, &TokenState::Absent),
        RoleDecision::Refused(RoleRefusal::PolicyFile(_))
    ));
    let why = p.explain(&c, &token(production));
    assert!(why.contains("from the job's verified ID token"), "{why}");
    assert!(why.contains("AssumeRoleWithWebIdentity"), "{why}");
    let why = p.explain(&c, &TokenState::Absent);
    assert!(why.contains("from gitlab-runner's labels"), "{why}");
    assert!(why.contains("only an ID token tells"), "{why}");
}

#[test]
fn a_decision_made_for_one_token_is_made_again_for_another() {
    let p = policy(&["arn:aws:iam::123456789012:role/*"]);
    let c = Arc::new(container(&["IAM_ROLE=deploy"], &[]));
    let first = token(serde_json::json!({}));
    let a = p.decision(&c, &first);
    assert!(Arc::ptr_eq(&a, &p.decision(&c, &first)));
    let b = p.decision(&c, &TokenState::Absent);
    assert!(matches!(
        &*b,
        RoleDecision::Role(Role { id_token: None, .. })
    ));
    assert!(matches!(
        &*p.decision(&c, &first),
        RoleDecision::Role(Role {
            id_token: Some(_),
            ..
        })
    ));
}

trait ForTest {
    fn to_string_for_test(&self) -> String;
}

impl ForTest for RoleDecision {
    fn to_string_for_test(&self) -> String {
        match self {
            RoleDecision::Refused(r) => r.to_string(),
            other => format!("{other:?}"),
        }
    }
}
