//! The role policy by runner, project and ref, and gitlab-runner's
//! container types, through the whole request path in-process: what a file
//! admits, what it refuses and why, and how a swap applies at once.

mod support;

use metaproxy::{ops::connlog::Outcome, policy::file::PolicyFile};
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
                "CI_PROJECT_ID=42",
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
                "CI_PROJECT_ID=42",
                "CI_PROJECT_PATH=group/other",
                "CI_COMMIT_REF_PROTECTED=true",
                "IAM_ROLE=ci-deploy",
            ],
        ),
    );
    // A job variable cannot make its ref protected: two values are no fact.
    let unprotected = bed.container(
        3,
        job(
            &main_ref,
            &[
                "CI_JOB_ID=3",
                "CI_PROJECT_ID=42",
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
    let text = bed
        .policy
        .explain(&c, &metaproxy::model::id_token::TokenState::Absent);
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

const RUNNERS: &str = r#"
[[runner]]
id = "abc123xy"
name = "deploys"
roles = ["arn:aws:iam::123456789012:role/ci-*"]
"#;

const RUNNER_LABEL: &str = "com.gitlab.gitlab-runner.runner.id";

#[tokio::test]
async fn with_runners_listed_a_job_of_another_runner_gets_nothing_and_is_told_why() {
    let bed = bed().await;
    bed.policy
        .set_file(Some(PolicyFile::parse("runners.toml", RUNNERS).unwrap()));
    let env = &["CI_JOB_ID=1", "IAM_ROLE=ci-deploy"];
    let listed = bed.container(1, job(&[(RUNNER_LABEL, "abc123xy")], env));
    let unlisted = bed.container(2, job(&[(RUNNER_LABEL, "zzz999")], env));
    let unlabelled = bed.container(3, job(&[], env));
    // An image cannot bring the runner's label: it is not the runner's.
    let forged = bed.container(
        4,
        Spec {
            env,
            labels: &[(RUNNER_LABEL, "abc123xy")],
            image_labels: &[(RUNNER_LABEL, "abc123xy")],
            ..Default::default()
        },
    );
    assert_eq!(bed.request(&listed, "GET", CREDS, &[]).await.status, 200);
    for (who, why) in [
        (&unlisted, "runner zzz999 is not listed in runners.toml"),
        (
            &unlabelled,
            "no com.gitlab.gitlab-runner.runner.id label of the runner's own, and runners.toml lists runners",
        ),
        (
            &forged,
            "no com.gitlab.gitlab-runner.runner.id label of the runner's own",
        ),
    ] {
        let got = bed.request(who, "GET", CREDS, &[]).await;
        assert_eq!(got.status, 404, "{got:?}");
        let logged = bed.last_log();
        assert_eq!(logged.outcome, Outcome::Refused);
        let reason = logged.reason.unwrap();
        assert!(reason.contains(why), "{reason}");
    }
    // `policy explain` names the runner.
    let c = bed.runtime.containers.lock().unwrap()[&support::container_id(2)].clone();
    let text = bed
        .policy
        .explain(&c, &metaproxy::model::id_token::TokenState::Absent);
    assert!(
        text.contains("decision: refused: runner zzz999 is not listed in runners.toml"),
        "{text}"
    );
    assert!(
        text.contains("policy file: runners.toml (0 rules, 1 runners)"),
        "{text}"
    );
    assert_eq!(bed.sts.calls(), 1, "only the listed runner's job");
}

#[tokio::test]
async fn a_listed_runner_gets_only_its_roles_and_rules_still_apply() {
    let bed = bed().await;
    let file = format!("{RUNNERS}{POLICY}");
    bed.policy
        .set_file(Some(PolicyFile::parse("both.toml", &file).unwrap()));
    let labels = [
        (RUNNER_LABEL, "abc123xy"),
        ("com.gitlab.gitlab-runner.project.id", "42"),
        ("com.gitlab.gitlab-runner.job.ref", "main"),
    ];
    let env = |role: &'static str| -> Vec<&'static str> {
        vec![
            "CI_JOB_ID=1",
            "CI_PROJECT_ID=42",
            "CI_PROJECT_PATH=group/app",
            "CI_COMMIT_REF_PROTECTED=true",
            role,
        ]
    };
    let deploy = env("IAM_ROLE=ci-deploy");
    let admin = env("IAM_ROLE=admin");
    let a = bed.container(1, job(&labels, &deploy));
    let b = bed.container(2, job(&labels, &admin));
    assert_eq!(bed.request(&a, "GET", CREDS, &[]).await.status, 200);
    let got = bed
        .request(
            &b,
            "GET",
            "/latest/meta-data/iam/security-credentials/admin",
            &[],
        )
        .await;
    assert_eq!(got.status, 404);
    assert!(bed.last_log().reason.unwrap().contains(
        "arn:aws:iam::123456789012:role/admin is not in the roles of runner abc123xy (\"deploys\") in both.toml"
    ));
    // The rule on top: an unprotected ref of the listed runner is refused.
    let unprotected_env = [
        "CI_JOB_ID=3",
        "CI_PROJECT_ID=42",
        "CI_PROJECT_PATH=group/app",
        "CI_COMMIT_REF_PROTECTED=false",
        "IAM_ROLE=ci-deploy",
    ];
    let c = bed.container(3, job(&labels, &unprotected_env));
    assert_eq!(bed.request(&c, "GET", CREDS, &[]).await.status, 404);
    assert!(bed
        .last_log()
        .reason
        .unwrap()
        .starts_with("no rule in both.toml allows"));
}

#[tokio::test]
async fn a_project_path_or_protected_flag_set_twice_or_for_another_project_is_unknown() {
    let bed = bed().await;
    bed.policy
        .set_file(Some(PolicyFile::parse("policy.toml", POLICY).unwrap()));
    let labels = [
        ("com.gitlab.gitlab-runner.project.id", "42"),
        ("com.gitlab.gitlab-runner.job.ref", "main"),
    ];
    // What the old rule (the first occurrence wins) admitted: the
    // runner's values first, then the job's own, different ones.
    let twice_path = [
        "CI_JOB_ID=1",
        "CI_PROJECT_ID=42",
        "CI_PROJECT_PATH=group/app",
        "CI_COMMIT_REF_PROTECTED=true",
        "IAM_ROLE=ci-deploy",
        "CI_PROJECT_PATH=group/other",
    ];
    let twice_protected = [
        "CI_JOB_ID=2",
        "CI_PROJECT_ID=42",
        "CI_PROJECT_PATH=group/app",
        "CI_COMMIT_REF_PROTECTED=true",
        "IAM_ROLE=ci-deploy",
        "CI_COMMIT_REF_PROTECTED=false",
    ];
    // Variables of another project than the runner's label names.
    let other_project = [
        "CI_JOB_ID=3",
        "CI_PROJECT_ID=7",
        "CI_PROJECT_PATH=group/app",
        "CI_COMMIT_REF_PROTECTED=true",
        "IAM_ROLE=ci-deploy",
    ];
    let no_project_id = [
        "CI_JOB_ID=4",
        "CI_PROJECT_PATH=group/app",
        "CI_COMMIT_REF_PROTECTED=true",
        "IAM_ROLE=ci-deploy",
    ];
    for (n, env, why) in [
        (
            1,
            &twice_path[..],
            "project ? (id 42) on ref main (protected)",
        ),
        (
            2,
            &twice_protected[..],
            "project group/app (id 42) on ref main (not protected)",
        ),
        (
            3,
            &other_project[..],
            "project ? (id 42) on ref main (not protected)",
        ),
        (
            4,
            &no_project_id[..],
            "project ? (id 42) on ref main (not protected)",
        ),
    ] {
        let who = bed.container(n, job(&labels, env));
        let got = bed.request(&who, "GET", CREDS, &[]).await;
        assert_eq!(got.status, 404, "{n}: {got:?}");
        let reason = bed.last_log().reason.unwrap();
        assert!(reason.contains(why), "{n}: {reason}");
    }
}

#[tokio::test]
async fn an_image_with_the_runners_type_label_gets_no_role() {
    let bed = bed().await;
    // The image's label used to hide the runner's type: a helper-typed
    // container then skipped the type check.
    let helper = bed.container(
        1,
        Spec {
            env: &["CI_JOB_ID=1", "IAM_ROLE=ci-deploy"],
            labels: &[("com.gitlab.gitlab-runner.type", "predefined")],
            image_labels: &[("com.gitlab.gitlab-runner.type", "build")],
            ..Default::default()
        },
    );
    assert_eq!(bed.request(&helper, "GET", CREDS, &[]).await.status, 404);
    let logged = bed.last_log();
    assert_eq!(logged.outcome, Outcome::Refused);
    assert!(
        logged
            .reason
            .unwrap()
            .contains("the image carries gitlab-runner's com.gitlab.gitlab-runner.type label"),
        "{:?}",
        bed.last_log()
    );
    assert_eq!(bed.sts.calls(), 0);
}
