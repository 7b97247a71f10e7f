use std::collections::HashMap;

use super::*;
use crate::model::caller::Caller;
use crate::model::ids::ContainerId;

fn account() -> Arc<OnceLock<AccountId>> {
    let a = Arc::new(OnceLock::new());
    a.set(AccountId::parse("123456789012").unwrap()).unwrap();
    a
}

pub(super) fn policy(allow: &[&str]) -> Policy {
    let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
    Policy::new(&allow, &[], account()).unwrap()
}

pub(super) fn container(env: &[&str], image_env: &[&str]) -> Container {
    Container {
        id: ContainerId::parse(&"ab".repeat(32)).unwrap(),
        name: "job".into(),
        labels: HashMap::from([(gitlab::JOB_LABEL.to_string(), "7".to_string())]),
        env: env.iter().map(|s| s.to_string()).collect(),
        image_env: image_env.iter().map(|s| s.to_string()).collect(),
        image_labels: HashMap::new(),
        addresses: None,
        cgroup: None,
        wire: Default::default(),
    }
}

fn decide(p: &Policy, env: &[&str], image_env: &[&str]) -> RoleDecision {
    p.decide(&container(env, image_env))
}

fn role(arn: &str) -> RoleDecision {
    RoleDecision::Role(Role {
        arn: RoleArn::parse(arn).unwrap(),
        external_id: None,
        session_name: "gitlab-job-7".into(),
        session: Default::default(),
        id_token: None,
    })
}

#[test]
fn a_decision_is_made_once_per_container_and_again_when_the_policy_changes() {
    let p = policy(&["arn:aws:iam::123456789012:role/*"]);
    let c = Arc::new(container(&["IAM_ROLE=ci-deploy"], &[]));
    let first = p.decision(&c, &TokenState::Absent);
    assert_eq!(*first, role("arn:aws:iam::123456789012:role/ci-deploy"));
    assert!(
        Arc::ptr_eq(&first, &p.decision(&c, &TokenState::Absent)),
        "asked again: the same answer"
    );

    // A file that admits nothing: the very next request is refused.
    let file =
        "[[rule]]\nroles = [\"arn:aws:iam::123456789012:role/other\"]\nprojects = [\"**\"]\n";
    p.set_file(Some(PolicyFile::parse("p.toml", file).unwrap()));
    assert!(
        matches!(
            *p.decision(&c, &TokenState::Absent),
            RoleDecision::Refused(RoleRefusal::PolicyFile { .. })
        ),
        "{:?}",
        p.decision(&c, &TokenState::Absent)
    );
    p.set_file(None);
    assert_eq!(*p.decision(&c, &TokenState::Absent), *first);

    // The same id with other facts (the cache let the container go and
    // inspected it anew) is decided anew, never served the old answer.
    let other = Arc::new(container(&["IAM_ROLE=ci-other"], &[]));
    assert_eq!(
        *p.decision(&other, &TokenState::Absent),
        role("arn:aws:iam::123456789012:role/ci-other")
    );
}

#[test]
fn a_decision_made_before_the_account_was_known_is_made_again() {
    let account = Arc::new(OnceLock::new());
    let p = Policy::new(&[], &[], account.clone()).unwrap();
    let c = Arc::new(container(&["IAM_ROLE=ci-deploy"], &[]));
    assert_eq!(
        *p.decision(&c, &TokenState::Absent),
        RoleDecision::Refused(RoleRefusal::AccountUnknown)
    );
    account
        .set(AccountId::parse("123456789012").unwrap())
        .unwrap();
    assert_eq!(
        *p.decision(&c, &TokenState::Absent),
        role("arn:aws:iam::123456789012:role/ci-deploy")
    );
}

#[test]
fn decisions_of_gone_containers_are_let_go() {
    let p = policy(&[]);
    let live = Arc::new(container(&["IAM_ROLE=ci-deploy"], &[]));
    p.decision(&live, &TokenState::Absent);
    for n in 0..1000 {
        let mut gone = container(&["IAM_ROLE=ci-deploy"], &[]);
        gone.id = ContainerId::parse(&format!("{n:064x}")).unwrap();
        p.decision(&Arc::new(gone), &TokenState::Absent);
    }
    // Pruned as it grows: bounded by the live containers, not by every
    // container ever seen.
    assert!(
        p.decisions_held() <= 2 * DECIDED_PRUNE_MIN,
        "{}",
        p.decisions_held()
    );
    assert!(Arc::ptr_eq(
        &p.decision(&live, &TokenState::Absent),
        &p.decision(&live, &TokenState::Absent)
    ));
}

fn refused(d: RoleDecision) -> String {
    match d {
        RoleDecision::Refused(r) => r.to_string(),
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn names_and_arns() {
    let p = policy(&[]);
    assert_eq!(
        decide(&p, &["IAM_ROLE=deploy"], &[]),
        role("arn:aws:iam::123456789012:role/deploy")
    );
    assert_eq!(
        decide(
            &p,
            &["IAM_ROLE=arn:aws:iam::123456789012:role/ci/deploy"],
            &[]
        ),
        role("arn:aws:iam::123456789012:role/ci/deploy")
    );
    let RoleDecision::Role(r) = decide(&p, &["IAM_ROLE=ci/deploy"], &[]) else {
        panic!()
    };
    assert_eq!(r.arn.name(), "deploy");
}

#[test]
fn no_role_unless_the_runner_sets_one() {
    let p = policy(&[]);
    assert_eq!(decide(&p, &["PATH=/bin"], &[]), RoleDecision::NoRole);
    assert_eq!(decide(&p, &["IAM_ROLE="], &[]), RoleDecision::NoRole);
    // The image's ENV shows up in Config.Env too; it must not count.
    let from_image = decide(&p, &["IAM_ROLE=admin"], &["IAM_ROLE=admin"]);
    assert!(refused(from_image).contains("image"));
    // The runner overriding the image's value is the runner's choice.
    assert_eq!(
        decide(&p, &["IAM_ROLE=deploy"], &["IAM_ROLE=admin"]),
        role("arn:aws:iam::123456789012:role/deploy")
    );
    // ... and so is the runner clearing it.
    assert_eq!(
        decide(&p, &["IAM_ROLE="], &["IAM_ROLE=admin"]),
        RoleDecision::NoRole
    );
}

#[test]
fn conflicting_or_malformed_values_are_refused() {
    let p = policy(&[]);
    assert!(refused(decide(&p, &["IAM_ROLE=a", "IAM_ROLE=b"], &[])).contains("more than once"));
    assert_eq!(
        decide(&p, &["IAM_ROLE=a", "IAM_ROLE=a"], &[]),
        role("arn:aws:iam::123456789012:role/a")
    );
    assert!(refused(decide(&p, &["IAM_ROLE=arn:aws:s3:::bucket"], &[])).contains("not a role ARN"));
    assert!(refused(decide(&p, &["IAM_ROLE=bad name"], &[])).contains("not a valid role name"));
    assert!(refused(decide(
        &p,
        &["IAM_ROLE=x", "IAM_EXTERNAL_ID=1", "IAM_EXTERNAL_ID=2"],
        &[]
    ))
    .contains("IAM_EXTERNAL_ID"));
}

#[test]
fn allow_list_and_default_account_rule() {
    let p = policy(&[]);
    let other = decide(&p, &["IAM_ROLE=arn:aws:iam::999999999999:role/x"], &[]);
    assert!(refused(other).contains("account"));
    let unknown = Policy::new(&[], &[], Arc::new(OnceLock::new())).unwrap();
    assert_eq!(
        refused(decide(&unknown, &["IAM_ROLE=x"], &[])),
        "the instance profile's account is not known yet"
    );

    let p = policy(&["arn:aws:iam::*:role/ci-*"]);
    assert_eq!(
        decide(
            &p,
            &["IAM_ROLE=arn:aws:iam::999999999999:role/ci-build"],
            &[]
        ),
        role("arn:aws:iam::999999999999:role/ci-build")
    );
    assert!(refused(decide(&p, &["IAM_ROLE=admin"], &[])).contains("--allow-role"));
    let RoleDecision::Role(with_ext) = decide(&p, &["IAM_ROLE=ci-x", "IAM_EXTERNAL_ID=abc"], &[])
    else {
        panic!()
    };
    assert_eq!(with_ext.arn.as_str(), "arn:aws:iam::123456789012:role/ci-x");
    assert_eq!(with_ext.external_id.as_deref(), Some("abc"));
    let err = Policy::new(&["[".into()], &[], account()).unwrap_err();
    // The glob's own message comes once, as the source.
    assert_eq!(err.to_string(), "--allow-role \"[\"");
    let chain = format!("{:#}", anyhow::Error::from(err));
    assert_eq!(chain.matches("unclosed").count(), 1, "{chain}");
}

#[test]
fn external_ids_follow_sts_rules_and_are_never_echoed() {
    let p = policy(&[]);
    let RoleDecision::Role(r) = decide(&p, &["IAM_ROLE=x", "IAM_EXTERNAL_ID=ab:c/d-1"], &[]) else {
        panic!()
    };
    assert_eq!(r.external_id.as_deref(), Some("ab:c/d-1"));
    for bad in ["Q", "line\nINFO forged", "has space"] {
        let env = format!("IAM_EXTERNAL_ID={bad}");
        let reason = refused(decide(&p, &["IAM_ROLE=x", &env], &[]));
        assert!(
            reason.starts_with("IAM_EXTERNAL_ID is not a valid"),
            "{reason}"
        );
        assert!(!reason.contains(bad), "{reason}");
    }
    let long = format!("IAM_EXTERNAL_ID={}", "a".repeat(1225));
    assert!(matches!(
        decide(&p, &["IAM_ROLE=x", &long], &[]),
        RoleDecision::Refused(_)
    ));
}

#[test]
fn roles_go_only_to_containers_the_runner_labelled() {
    let p = policy(&[]);
    // A classic `docker build` step with `ARG IAM_ROLE=ci-deploy`: the
    // value is in its environment, not in the image's ENV.
    let mut step = container(&["IAM_ROLE=ci-deploy"], &[]);
    step.labels.clear();
    assert_eq!(p.decide(&step), RoleDecision::Refused(RoleRefusal::NotAJob));
    // ... nor may an image carry the runner's label into one.
    step.image_labels
        .insert(gitlab::JOB_LABEL.into(), "7".into());
    step.labels.insert(gitlab::JOB_LABEL.into(), "7".into());
    assert_eq!(p.decide(&step), RoleDecision::Refused(RoleRefusal::NotAJob));
    // Without IAM_ROLE, nothing to refuse.
    let mut plain = container(&[], &[]);
    plain.labels.clear();
    assert_eq!(p.decide(&plain), RoleDecision::NoRole);
}

#[test]
fn an_image_carrying_the_runners_type_label_is_refused() {
    // The type check reads the runner's label only; before, an image
    // bringing the label made it absent, and the check was skipped:
    // a helper-like container with IAM_ROLE got the role.
    let p = policy(&[]);
    let mut c = container(&["IAM_ROLE=ci-deploy"], &[]);
    c.labels
        .insert(gitlab::TYPE_LABEL.into(), "predefined".into());
    c.image_labels
        .insert(gitlab::TYPE_LABEL.into(), "predefined".into());
    assert_eq!(
        p.decide(&c),
        RoleDecision::Refused(RoleRefusal::ImageLabel(gitlab::TYPE_LABEL))
    );
    assert!(refused(p.decide(&c)).contains("the image carries"));
    // Whatever value either one has.
    c.labels.insert(gitlab::TYPE_LABEL.into(), "build".into());
    assert!(matches!(p.decide(&c), RoleDecision::Refused(_)));
    c.image_labels.clear();
    assert!(matches!(p.decide(&c), RoleDecision::Role(_)));
}

#[test]
fn with_runners_listed_only_their_jobs_get_their_roles() {
    let p = policy(&[]);
    let file = r#"
[[runner]]
id = "abc123xy"
name = "deploy runner"
roles = ["arn:aws:iam::123456789012:role/deploy-*"]
"#;
    p.set_file(Some(PolicyFile::parse("runners.toml", file).unwrap()));
    let job = |runner: Option<&str>, role: &str| {
        let env = format!("IAM_ROLE={role}");
        let mut c = container(&[&env], &[]);
        if let Some(id) = runner {
            c.labels
                .insert("com.gitlab.gitlab-runner.runner.id".into(), id.into());
        }
        c
    };
    assert!(matches!(
        p.decide(&job(Some("abc123xy"), "deploy-prod")),
        RoleDecision::Role(_)
    ));
    assert_eq!(
        refused(p.decide(&job(Some("other999"), "deploy-prod"))),
        "runner other999 is not listed in runners.toml"
    );
    assert!(refused(p.decide(&job(None, "deploy-prod")))
        .contains("no com.gitlab.gitlab-runner.runner.id label of the runner's own"));
    assert_eq!(
        refused(p.decide(&job(Some("abc123xy"), "admin"))),
        "arn:aws:iam::123456789012:role/admin is not in the roles of runner abc123xy (\"deploy runner\") in runners.toml"
    );
    // The image's label of that name is not the runner's.
    let mut forged = job(Some("abc123xy"), "deploy-prod");
    forged.image_labels.insert(
        "com.gitlab.gitlab-runner.runner.id".into(),
        "abc123xy".into(),
    );
    assert!(refused(p.decide(&forged)).contains("of the runner's own"));
    // `policy explain` says which runner and why.
    let text = p.explain(&job(Some("other999"), "deploy-prod"), &TokenState::Absent);
    assert!(
        text.contains("decision: refused: runner other999 is not listed in runners.toml"),
        "{text}"
    );
    assert!(text.contains("runner other999"), "{text}");
    assert!(
        text.contains("runners: no: runner other999 is not listed"),
        "{text}"
    );
}

#[test]
fn rules_apply_on_top_of_the_runners() {
    let p = policy(&[]);
    let file = r#"
[[runner]]
id = "abc123xy"
roles = ["arn:aws:iam::123456789012:role/*"]

[[rule]]
roles = ["arn:aws:iam::123456789012:role/deploy-*"]
projects = ["42"]
"#;
    p.set_file(Some(PolicyFile::parse("p.toml", file).unwrap()));
    let job = |project: &str| {
        let mut c = container(&["IAM_ROLE=deploy-prod"], &[]);
        c.labels.insert(
            "com.gitlab.gitlab-runner.runner.id".into(),
            "abc123xy".into(),
        );
        c.labels
            .insert("com.gitlab.gitlab-runner.project.id".into(), project.into());
        c
    };
    assert!(matches!(p.decide(&job("42")), RoleDecision::Role(_)));
    assert!(refused(p.decide(&job("43"))).starts_with("no rule in p.toml allows"));
}

#[test]
fn role_globs_never_cross_a_path_separator() {
    let p = policy(&["arn:aws:iam::123456789012:role/ci-*"]);
    assert!(matches!(
        decide(&p, &["IAM_ROLE=ci-x"], &[]),
        RoleDecision::Role(_)
    ));
    // Role `admin` under path /ci-x/ is not a `ci-*` role.
    let pathed = decide(
        &p,
        &["IAM_ROLE=arn:aws:iam::123456789012:role/ci-x/admin"],
        &[],
    );
    assert!(refused(pathed).contains("--allow-role"));
    assert!(refused(decide(&p, &["IAM_ROLE=ci-x/admin"], &[])).contains("--allow-role"));
    // `**` is how an admin admits paths on purpose.
    let p = policy(&["arn:aws:iam::123456789012:role/ci/**"]);
    assert!(matches!(
        decide(
            &p,
            &["IAM_ROLE=arn:aws:iam::123456789012:role/ci/x/deploy"],
            &[]
        ),
        RoleDecision::Role(_)
    ));
}

fn caller(path: Option<&str>, comm: &str) -> Caller {
    Caller {
        peer: "127.0.0.1:1".parse().unwrap(),
        cgroup: crate::model::ids::CgroupId(1),
        cgroup_path: path.map(Into::into),
        pid: 1,
        comm: comm.into(),
        original_dst: "169.254.169.254:80".parse().unwrap(),
        boot_ns: 0,
        via: crate::model::caller::Via::Direct,
    }
}

#[test]
fn host_processes_pass_only_from_allow_listed_cgroups() {
    let none = Policy::new(&[], &[], account()).unwrap();
    let agent = caller(Some("/system.slice/amazon-ssm-agent.service"), "ssm-agent");
    assert!(matches!(
        none.host_access(&agent),
        Err(HostRefusal::NotAllowListed(_))
    ));
    let p = Policy::new(
        &[],
        &[
            "/system.slice/amazon-ssm-agent.service".into(),
            "/system.slice/gitlab-runner*".into(),
        ],
        account(),
    )
    .unwrap();
    assert_eq!(p.host_access(&agent), Ok(()));
    assert_eq!(
        p.host_access(&caller(
            Some("/system.slice/gitlab-runner.service"),
            "gitlab-runner"
        )),
        Ok(())
    );
    for (path, comm) in [
        ("/", "curl"),
        ("/system.slice/gitlab-runner.service/x", "sh"),
        ("/system.slice/docker.service", "curl"),
        ("/user.slice/user-0.slice/session-1.scope", "curl"),
    ] {
        assert!(p.host_access(&caller(Some(path), comm)).is_err(), "{path}");
    }
    // Allow-listed or not, runtimes and build steps never pass.
    let wide = Policy::new(&[], &["/**".into()], account()).unwrap();
    assert!(matches!(
        wide.host_access(&caller(Some("/system.slice/docker.service"), "dockerd")),
        Err(HostRefusal::ContainerRuntime(_))
    ));
    for step in [
        "/docker/buildkit/abcdefghijklmnopqrstuvwxy",
        "/system.slice/buildkit-abc.scope",
        "/system.slice/docker-lq1hn4a0qq7ek6tq8tqmb9p8u.scope",
    ] {
        assert!(matches!(
            wide.host_access(&caller(Some(step), "sh")),
            Err(HostRefusal::BuildStep(_))
        ));
    }
    assert_eq!(
        wide.host_access(&caller(None, "sh")),
        Err(HostRefusal::UnknownCgroup)
    );
}

#[test]
fn session_names_follow_sts_rules() {
    assert_eq!(
        gitlab::clean_session_name("gitlab-job-12345"),
        "gitlab-job-12345"
    );
    assert_eq!(
        gitlab::clean_session_name("job 7/deploy:prod"),
        "job-7-deploy-prod"
    );
    assert_eq!(gitlab::clean_session_name("a"), "a-");
    assert_eq!(gitlab::clean_session_name(""), "--");
    assert_eq!(gitlab::clean_session_name("ü"), "--");
    assert_eq!(gitlab::clean_session_name(&"x".repeat(100)).len(), 64);
    assert_eq!(gitlab::clean_session_name("a+b=c,d.e@f_g"), "a+b=c,d.e@f_g");
    let mut c = container(&[], &[]);
    c.labels.insert(gitlab::JOB_LABEL.into(), "42".into());
    assert_eq!(gitlab::session_name(&c), "gitlab-job-42");
    c.labels.clear();
    assert_eq!(gitlab::session_name(&c), "container-abababababab");
}
