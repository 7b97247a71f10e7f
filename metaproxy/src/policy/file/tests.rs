use super::*;

const FILE: &str = r#"
# deploys: only the app, only from protected release refs
[[rule]]
roles = ["arn:aws:iam::123456789012:role/deploy-*"]
projects = ["group/app", "77"]
refs = ["main", "release/*"]
protected = true

[[rule]]
roles = ["arn:aws:iam::123456789012:role/read-only"]
projects = ["group/**"]
"#;

fn facts(path: &str, id: &str, r: &str, protected: bool) -> Facts {
    Facts {
        runner_id: None,
        project_id: Some(id.into()),
        project_path: Some(path.into()),
        git_ref: Some(r.into()),
        protected,
        ..Facts::default()
    }
}

fn arn(name: &str) -> RoleArn {
    RoleArn::parse(&format!("arn:aws:iam::123456789012:role/{name}")).unwrap()
}

#[test]
fn rules_admit_projects_on_refs_and_deny_the_rest() {
    let p = PolicyFile::parse("policy.toml", FILE).unwrap();
    assert_eq!(p.rules(), 2);
    let deploy = arn("deploy-prod");
    assert_eq!(
        p.allows(&deploy, &facts("group/app", "1", "main", true)),
        Some(3)
    );
    assert_eq!(
        p.allows(&deploy, &facts("other/x", "77", "release/1", true)),
        Some(3)
    );
    assert_eq!(
        p.allows(&deploy, &facts("group/app", "1", "main", false)),
        None
    );
    assert_eq!(
        p.allows(&deploy, &facts("group/app", "1", "feature/x", true)),
        None
    );
    assert_eq!(
        p.allows(&deploy, &facts("group/other", "2", "main", true)),
        None
    );
    // `*` in a ref glob stays within one path segment.
    assert_eq!(
        p.allows(&deploy, &facts("group/app", "1", "release/1/x", true)),
        None
    );
    let ro = arn("read-only");
    assert_eq!(
        p.allows(&ro, &facts("group/sub/lib", "5", "dev", false)),
        Some(9)
    );
    assert_eq!(
        p.allows(&arn("admin"), &facts("group/app", "1", "main", true)),
        None
    );
    let why = p.explain(&deploy, &facts("group/app", "1", "main", false));
    assert!(
        why.contains("rule at line 3: no: the ref is not protected"),
        "{why}"
    );
    assert!(
        why.contains(
            "rule at line 9: no: arn:aws:iam::123456789012:role/deploy-prod is not in roles"
        ),
        "{why}"
    );
}

fn runner(id: &str) -> Facts {
    Facts {
        runner_id: Some(id.into()),
        ..facts("group/app", "1", "main", true)
    }
}

#[test]
fn runner_entries_admit_their_runners_roles_and_rules_apply_on_top() {
    let only_runners = r#"
[[runner]]
id = "abc123xy"
name = "deploy"
roles = ["arn:aws:iam::123456789012:role/deploy-*"]

[[runner]]
id = "zz9"
roles = ["arn:aws:iam::123456789012:role/read-only"]
"#;
    let p = PolicyFile::parse("r.toml", only_runners).unwrap();
    assert_eq!((p.runners(), p.rules()), (2, 0));
    assert_eq!(p.check(&arn("deploy-prod"), &runner("abc123xy")), Ok(()));
    assert_eq!(p.check(&arn("read-only"), &runner("zz9")), Ok(()));
    assert!(matches!(
        p.check(&arn("read-only"), &runner("abc123xy")),
        Err(FileRefusal::NotTheRunnersRole { .. })
    ));
    assert_eq!(
        p.check(&arn("deploy-prod"), &runner("nope"))
            .unwrap_err()
            .to_string(),
        "runner nope is not listed in r.toml"
    );
    let unlabelled = Facts {
        runner_id: None,
        ..runner("x")
    };
    assert!(matches!(
        p.check(&arn("deploy-prod"), &unlabelled),
        Err(FileRefusal::NoRunner { .. })
    ));
    // Ids are literal: no glob matches a runner.
    let p = PolicyFile::parse(
        "r.toml",
        "[[runner]]\nid = \"abc\"\nroles = [\"arn:aws:iam::1:role/x\"]\n",
    )
    .unwrap();
    assert!(p.check(&arn("x"), &runner("abcd")).is_err());

    // With rules too, both must allow.
    let both = format!("{only_runners}{FILE}");
    let p = PolicyFile::parse("b.toml", &both).unwrap();
    assert_eq!(p.check(&arn("deploy-prod"), &runner("abc123xy")), Ok(()));
    let unprotected = Facts {
        protected: false,
        ..runner("abc123xy")
    };
    assert!(matches!(
        p.check(&arn("deploy-prod"), &unprotected),
        Err(FileRefusal::NoRule { .. })
    ));
    assert!(matches!(
        p.check(&arn("deploy-prod"), &runner("zz9")),
        Err(FileRefusal::NotTheRunnersRole { .. })
    ));
    let why = p.explain(&arn("deploy-prod"), &runner("abc123xy"));
    assert!(
        why.contains("runner abc123xy (\"deploy\") at line 2: allows"),
        "{why}"
    );
    // Neither: nothing is allowed.
    let empty = PolicyFile::parse("e.toml", "").unwrap();
    assert!(empty.check(&arn("x"), &runner("abc123xy")).is_err());
}

#[test]
fn runner_entries_are_checked_like_rules() {
    let role = "roles = [\"arn:aws:iam::1:role/x\"]";
    for (text, want) in [
        (
            "[[runner]]\nid = \"a\"\nroles = []\n".to_string(),
            "line 1: roles: list at least one",
        ),
        (
            "[[runner]]\nroles = [\"arn:aws:iam::1:role/x\"]\n".to_string(),
            "missing field `id`",
        ),
        (
            format!("[[runner]]\nid = \"\"\n{role}\n"),
            "line 1: id: \"\" is not a runner id",
        ),
        (
            format!("[[runner]]\nid = \"ab*\"\n{role}\n"),
            "is not a runner id",
        ),
        (
            format!("[[runner]]\nid = \"a b\"\n{role}\n"),
            "is not a runner id",
        ),
        (
            "[[runner]]\nid = \"a\"\nroles = [\"deploy\"]\n".to_string(),
            "roles: \"deploy\" is not a role ARN glob",
        ),
        (
            "[[runner]]\nid = \"a\"\nroles = [\"arn:[\"]\n".to_string(),
            "line 1: roles",
        ),
        (
            format!("[[runner]]\nid = \"a\"\n{role}\nrole = [\"x\"]\n"),
            "unknown field `role`",
        ),
        (
            format!("[[runner]]\nid = \"a\"\n{role}\n\n[[runner]]\nid = \"a\"\n{role}\n"),
            "line 5: id: runner a is listed already, at line 1",
        ),
        (
            format!("[[runners]]\nid = \"a\"\n{role}\n"),
            "unknown field `runners`",
        ),
    ] {
        let e = PolicyFile::parse("p.toml", &text).unwrap_err().to_string();
        assert!(e.contains(want), "{text:?}: {e}");
    }
}

#[test]
fn errors_name_the_line_and_what_is_wrong() {
    for (text, want) in [
        ("[[rule]]\nroles = [\"arn:aws:iam::1:role/x\"]\nprojects = []\n", "line 1: projects"),
        ("[[rule]]\nroles = [\"deploy\"]\nprojects = [\"a\"]\n", "line 1: roles: \"deploy\" is not a role ARN glob"),
        ("\n\n[[rule]]\nroles = [\"arn:[\"]\nprojects = [\"a\"]\n", "line 3: roles"),
        ("[[rule]]\nroles = [\"arn:aws:iam::1:role/x\"]\nprojects = [\"a\"]\nrefz = [\"main\"]\n", "unknown field `refz`"),
        ("[[rule]\n", "line 1"),
        ("[[rule]]\nroles = [\"arn:aws:iam::1:role/x\"]\nprojects = [\"a\"]\nrefs = []\n", "refs: an empty list"),
    ] {
        let e = PolicyFile::parse("p.toml", text).unwrap_err().to_string();
        assert!(e.contains(want), "{text:?}: {e}");
        assert!(e.starts_with("p.toml"), "{e}");
    }
}
