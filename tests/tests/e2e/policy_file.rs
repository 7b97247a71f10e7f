//! The policy file: `policy check`, `policy explain`, reloads and runners.

use std::time::Duration;

use metaproxy_tests::{
    bed::{role_arn, E2eBed, ROLE_DEPLOY},
    scratch::ScratchDir,
    wait_for,
};

use crate::{assert_real_imds_untouched, refusals, CREDS};

fn policy_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(metaproxy_tests::daemon::metaproxy_bin())
        .arg("policy")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_policy_file_admits_one_project_on_a_protected_ref_and_a_broken_reload_keeps_it() {
    let scratch = ScratchDir::new("mpt").unwrap();
    let path = scratch.join("policy.toml");
    let rule = |projects: &str| {
        format!(
            "[[rule]]\nroles = [\"arn:aws:iam::123456789012:role/ci-*\"]\nprojects = [{projects}]\nrefs = [\"main\"]\nprotected = true\n"
        )
    };
    std::fs::write(&path, rule("\"group/a\"")).unwrap();
    let path_str = path.to_str().unwrap();
    // `policy check` says ok, or names the line.
    let ok = policy_cli(&["check", path_str]);
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("ok, 1 rules"));

    let bed = E2eBed::start(&["--policy-file", path_str]).expect("bed");
    // As gitlab-runner sets them: the project id label and CI_PROJECT_ID
    // agree, or the path counts for nothing.
    let project = |name: &str, path: &str, id: &str, runner: &str| {
        let project_label = format!("com.gitlab.gitlab-runner.project.id={id}");
        let runner_label = format!("com.gitlab.gitlab-runner.runner.id={runner}");
        bed.container(
            name,
            bed.base_image(),
            &[
                ("CI_JOB_ID", "1"),
                ("CI_PROJECT_ID", id),
                ("CI_PROJECT_PATH", path),
                ("CI_COMMIT_REF_PROTECTED", "true"),
                ("IAM_ROLE", ROLE_DEPLOY),
            ],
            &[
                "--label",
                "com.gitlab.gitlab-runner.job.ref=main",
                "--label",
                &project_label,
                "--label",
                &runner_label,
            ],
        )
        .unwrap()
    };
    let a = project("proj-a", "group/a", "10", "runner-a");
    let b = project("proj-b", "group/b", "20", "runner-b");
    let creds = format!("{CREDS}{ROLE_DEPLOY}");
    let get = |c: &metaproxy_tests::bed::Container| {
        let auth = c.token_header(60);
        c.imds("GET", &creds, &[&auth])["status"].as_u64().unwrap()
    };
    assert_eq!(get(&a), 200);
    assert_eq!(get(&b), 404);
    let reasons = refusals(&bed, "proj-b");
    assert!(
        reasons.iter().any(|r| r.contains(&format!(
            "no rule in {path_str} allows {} for project group/b",
            role_arn(ROLE_DEPLOY)
        ))),
        "{reasons:?}"
    );
    // `policy explain` asks the daemon, rule by rule.
    let explained = bed
        .daemon
        .admin_command(&["policy", "explain", "proj-b"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&explained.stdout);
    assert!(explained.status.success(), "{explained:?}");
    assert!(text.contains("decision: refused: no rule"), "{text}");
    assert!(
        text.contains(
            "rule at line 1: no: project group/b (id 20) is not in projects [\"group/a\"]"
        ),
        "{text}"
    );

    // A broken file is never applied: the daemon says why and keeps the
    // policy in force.
    std::fs::write(&path, "[[rule]\nroles = [").unwrap();
    let bad = policy_cli(&["check", path_str]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("line 1"),
        "{bad:?}"
    );
    wait_for("the failed reload", Duration::from_secs(10), || {
        bed.daemon
            .log()
            .contains("policy file not reloaded: the previous policy stays in force")
            .then_some(())
    })
    .unwrap();
    assert_eq!(get(&a), 200);
    assert_eq!(get(&b), 404);

    // A good file applies on change, and again on SIGHUP.
    std::fs::write(&path, rule("\"group/a\", \"group/b\"")).unwrap();
    wait_for("the reload", Duration::from_secs(10), || {
        bed.daemon
            .log()
            .contains("policy file reloaded")
            .then_some(())
    })
    .unwrap();
    assert_eq!(get(&b), 200);
    let reloads = || bed.daemon.log().matches("policy file reloaded").count();
    let before = reloads();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(bed.daemon.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_for("the SIGHUP reload", Duration::from_secs(10), || {
        (reloads() > before).then_some(())
    })
    .unwrap();

    // Runner entries: once any is in force, only listed runners' jobs get
    // roles, and only theirs.
    let runners = format!(
        "[[runner]]\nid = \"runner-a\"\nname = \"deploys\"\nroles = [\"{}\"]\n\n{}",
        role_arn(ROLE_DEPLOY),
        rule("\"group/a\", \"group/b\"")
    );
    std::fs::write(&path, &runners).unwrap();
    let checked = policy_cli(&["check", path_str]);
    assert!(checked.status.success(), "{checked:?}");
    let before = reloads();
    wait_for("the runners reload", Duration::from_secs(10), || {
        (reloads() > before).then_some(())
    })
    .unwrap();
    assert_eq!(get(&a), 200);
    assert_eq!(get(&b), 404);
    let reasons = refusals(&bed, "proj-b");
    assert!(
        reasons
            .iter()
            .any(|r| r == &format!("runner runner-b is not listed in {path_str}")),
        "{reasons:?}"
    );
    // A typo in the table is caught before it is applied.
    std::fs::write(&path, runners.replace("roles", "role")).unwrap();
    let typo = policy_cli(&["check", path_str]);
    assert!(!typo.status.success());
    assert!(
        String::from_utf8_lossy(&typo.stderr).contains("unknown field `role`"),
        "{typo:?}"
    );
    assert_real_imds_untouched(&bed);
}
