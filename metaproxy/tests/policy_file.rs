//! The role policy by project and ref, and gitlab-runner's container types,
//! through the whole request path in-process: what a file admits, what it
//! refuses and why, and how a swap applies at once.

mod support;

use metaproxy::{connlog::Outcome, policy_file::PolicyFile};
use support::{bed, Spec};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/ci-deploy";

const POLICY: &str = r#"
[[rule]]
roles = ["arn:aws:iam::123456789012:role/ci-*"]
projects = ["group/app"]
refs = ["main"]
protected = true
"#;

fn job<'a>(labels: &'a [(&'a str, &'a str)], env: &'a [&'a str]) -> Spec<'a> {
    Spec {
        env,
        labels,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_policy_file_admits_a_project_on_a_protected_ref_and_refuses_the_rest() {
    let bed = bed().await;
    bed.policy
        .set_file(Some(PolicyFile::parse("policy.toml", POLICY).unwrap()));
    let main_ref = [
        ("com.gitlab.gitlab-runner.project.id", "42"),
        ("com.gitlab.gitlab-runner.job.ref", "main"),
    ];
    let a = bed.container(
        1,
        job(
            &main_ref,
            &[
                "CI_JOB_ID=1",
                "CI_PROJECT_PATH=group/app",
                "CI_COMMIT_REF_PROTECTED=true",
                "IAM_ROLE=ci-deploy",
            ],
        ),
    );
    let b = bed.container(
        2,
        job(
            &main_ref,
            &[
                "CI_JOB_ID=2",
                "CI_PROJECT_PATH=group/other",
                "CI_COMMIT_REF_PROTECTED=true",
                "IAM_ROLE=ci-deploy",
            ],
        ),
    );
    // A job variable cannot make its ref protected: the runner's comes first.
    let unprotected = bed.container(
        3,
        job(
            &main_ref,
            &[
                "CI_JOB_ID=3",
                "CI_PROJECT_PATH=group/app",
                "CI_COMMIT_REF_PROTECTED=false",
                "IAM_ROLE=ci-deploy",
                "CI_COMMIT_REF_PROTECTED=true",
            ],
        ),
    );
    assert_eq!(bed.request(&a, "GET", CREDS, &[]).await.status, 200);
    for (who, why) in [
        (&b, "project group/other (id 42) on ref main (protected)"),
        (&unprotected, "on ref main (not protected)"),
    ] {
        assert_eq!(bed.request(who, "GET", CREDS, &[]).await.status, 404);
        let logged = bed.last_log();
        assert_eq!(logged.outcome, Outcome::Refused);
        let reason = logged.reason.unwrap();
        assert!(
            reason
                .contains("no rule in policy.toml allows arn:aws:iam::123456789012:role/ci-deploy"),
            "{reason}"
        );
        assert!(reason.contains(why), "{reason}");
    }
    // The explanation goes rule by rule.
    let c = bed.runtime.containers.lock().unwrap()[&support::container_id(2)].clone();
    let text = bed.policy.explain(&c);
    assert!(text.contains("decision: refused: no rule"), "{text}");
    assert!(
        text.contains("rule at line 2: no: project group/other (id 42) is not in projects"),
        "{text}"
    );
    // A new file applies to the next request.
    bed.policy.set_file(Some(
        PolicyFile::parse(
            "policy.toml",
            "[[rule]]\nroles = [\"arn:aws:iam::123456789012:role/*\"]\nprojects = [\"group/*\"]\n",
        )
        .unwrap(),
    ));
    assert_eq!(bed.request(&b, "GET", CREDS, &[]).await.status, 200);
    bed.policy.set_file(None);
    assert_eq!(
        bed.request(&unprotected, "GET", CREDS, &[]).await.status,
        200
    );
}

#[tokio::test]
async fn the_runners_helper_gets_no_role_and_native_steps_are_named() {
    let bed = bed().await;
    let helper = bed.container(
        1,
        job(
            &[("com.gitlab.gitlab-runner.type", "predefined")],
            &["CI_JOB_ID=1", "IAM_ROLE=ci-deploy"],
        ),
    );
    let build = bed.container(
        2,
        job(
            &[("com.gitlab.gitlab-runner.type", "build")],
            &["CI_JOB_ID=2", "IAM_ROLE=ci-deploy"],
        ),
    );
    let service = bed.container(
        3,
        job(
            &[("com.gitlab.gitlab-runner.type", "service")],
            &["CI_JOB_ID=3", "IAM_ROLE=ci-deploy"],
        ),
    );
    assert_eq!(bed.request(&helper, "GET", CREDS, &[]).await.status, 404);
    assert!(bed
        .last_log()
        .reason
        .unwrap()
        .contains("a gitlab-runner \"predefined\" container"));
    assert_eq!(bed.request(&build, "GET", CREDS, &[]).await.status, 200);
    assert_eq!(bed.request(&service, "GET", CREDS, &[]).await.status, 200);
    // Native steps: a build container without the runner's environment.
    let native = bed.container(
        4,
        job(
            &[("com.gitlab.gitlab-runner.type", "build")],
            &["PATH=/bin"],
        ),
    );
    let listing = "/latest/meta-data/iam/security-credentials/";
    assert_eq!(bed.request(&native, "GET", listing, &[]).await.status, 404);
    let logged = bed.last_log();
    assert_eq!(logged.outcome, Outcome::NoRole);
    assert!(
        logged.reason.unwrap().contains("native steps mode"),
        "the admin is told why"
    );
}
