//! The policy file: `policy check`, `policy explain`, reloads and runners.

use std::{path::PathBuf, time::Duration};

use metaproxy_tests::{
    bed::{role_arn, Container, E2eBed, ROLE_DEPLOY},
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

/// A rule giving the `ci-*` roles to `projects` (the inside of a TOML
/// list) on protected `main`.
fn rule(projects: &str) -> String {
    format!(
        "[[rule]]\nroles = [\"arn:aws:iam::123456789012:role/ci-*\"]\nprojects = [{projects}]\nrefs = [\"main\"]\nprotected = true\n"
    )
}

/// A runner entry for `runner-a` alone, before the rule for both projects.
fn runners() -> String {
    format!(
        "[[runner]]\nid = \"runner-a\"\nname = \"deploys\"\nroles = [\"{}\"]\n\n{}",
        role_arn(ROLE_DEPLOY),
        rule("\"group/a\", \"group/b\"")
    )
}

/// A bed whose daemon reads a policy file the test may rewrite. The
/// file's directory goes after the bed (fields drop in order).
struct PolicyBed {
    bed: E2eBed,
    path: PathBuf,
    _dir: ScratchDir,
}

impl PolicyBed {
    fn start(policy: &str) -> Self {
        let dir = ScratchDir::new("mpt").unwrap();
        let path = dir.join("policy.toml");
        std::fs::write(&path, policy).unwrap();
        let bed = E2eBed::start(&["--policy-file", path.to_str().unwrap()]).expect("bed");
        Self {
            bed,
            path,
            _dir: dir,
        }
    }

    fn path_str(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// How many times the daemon has applied the file anew.
    fn reloads(&self) -> usize {
        self.bed
            .daemon
            .log()
            .matches("policy file reloaded")
            .count()
    }

    /// Writes `policy` and waits until the daemon has applied it.
    fn rewrite(&self, policy: &str, what: &str) {
        let before = self.reloads();
        std::fs::write(&self.path, policy).unwrap();
        wait_for(what, Duration::from_secs(10), || {
            (self.reloads() > before).then_some(())
        })
        .unwrap();
    }

    /// A job of project `path` (id `id`) on runner `runner`, on protected
    /// `main`, asking for the deploy role. As gitlab-runner sets them: the
    /// project id label and CI_PROJECT_ID agree, or the path counts for
    /// nothing.
    fn project(&self, name: &str, path: &str, id: &str, runner: &str) -> Container {
        let project_label = format!("com.gitlab.gitlab-runner.project.id={id}");
        let runner_label = format!("com.gitlab.gitlab-runner.runner.id={runner}");
        self.bed
            .container(
                name,
                self.bed.base_image(),
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
    }
}

/// The status of a request for the deploy role's credentials from `c`.
fn get(c: &Container) -> u64 {
    let auth = c.token_header(60);
    c.imds("GET", &format!("{CREDS}{ROLE_DEPLOY}"), &[&auth])["status"]
        .as_u64()
        .unwrap()
}

#[test]
fn policy_check_says_ok_names_the_line_and_catches_a_typo() {
    let scratch = ScratchDir::new("mpt").unwrap();
    let path = scratch.join("policy.toml");
    let path_str = path.to_str().unwrap();
    std::fs::write(&path, rule("\"group/a\"")).unwrap();
    let ok = policy_cli(&["check", path_str]);
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("ok, 1 rules"));

    std::fs::write(&path, "[[rule]\nroles = [").unwrap();
    let bad = policy_cli(&["check", path_str]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("line 1"),
        "{bad:?}"
    );

    std::fs::write(&path, runners()).unwrap();
    let checked = policy_cli(&["check", path_str]);
    assert!(checked.status.success(), "{checked:?}");
    // A typo in the table is caught before it is applied.
    std::fs::write(&path, runners().replace("roles", "role")).unwrap();
    let typo = policy_cli(&["check", path_str]);
    assert!(!typo.status.success());
    assert!(
        String::from_utf8_lossy(&typo.stderr).contains("unknown field `role`"),
        "{typo:?}"
    );
}

#[test]
fn a_policy_file_admits_one_project_on_a_protected_ref_and_a_broken_reload_keeps_it() {
    let policy = PolicyBed::start(&rule("\"group/a\""));
    let bed = &policy.bed;
    let a = policy.project("proj-a", "group/a", "10", "runner-a");
    let b = policy.project("proj-b", "group/b", "20", "runner-b");
    assert_eq!(get(&a), 200);
    assert_eq!(get(&b), 404);
    let reasons = refusals(bed, "proj-b");
    assert!(
        reasons.iter().any(|r| r.contains(&format!(
            "no rule in {} allows {} for project group/b",
            policy.path_str(),
            role_arn(ROLE_DEPLOY)
        ))),
        "{reasons:?}"
    );

    // A broken file is never applied: the daemon says why and keeps the
    // policy in force.
    std::fs::write(&policy.path, "[[rule]\nroles = [").unwrap();
    wait_for("the failed reload", Duration::from_secs(10), || {
        bed.daemon
            .log()
            .contains("policy file not reloaded: the previous policy stays in force")
            .then_some(())
    })
    .unwrap();
    assert_eq!(get(&a), 200);
    assert_eq!(get(&b), 404);
    assert_real_imds_untouched(bed);
}

#[test]
fn policy_explain_asks_the_daemon_rule_by_rule() {
    let policy = PolicyBed::start(&rule("\"group/a\""));
    let _b = policy.project("proj-b", "group/b", "20", "runner-b");
    let explained = policy
        .bed
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
    assert_real_imds_untouched(&policy.bed);
}

#[test]
fn a_good_policy_file_applies_on_change_and_again_on_sighup() {
    let policy = PolicyBed::start(&rule("\"group/a\""));
    let bed = &policy.bed;
    let b = policy.project("proj-b", "group/b", "20", "runner-b");
    assert_eq!(get(&b), 404);
    policy.rewrite(&rule("\"group/a\", \"group/b\""), "the reload");
    assert_eq!(get(&b), 200);
    let before = policy.reloads();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(bed.daemon.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_for("the SIGHUP reload", Duration::from_secs(10), || {
        (policy.reloads() > before).then_some(())
    })
    .unwrap();
    assert_real_imds_untouched(bed);
}

/// Once any runner entry is in force, only listed runners' jobs get
/// roles, and only theirs.
#[test]
fn runner_entries_admit_only_the_listed_runners_jobs() {
    let policy = PolicyBed::start(&rule("\"group/a\", \"group/b\""));
    let a = policy.project("proj-a", "group/a", "10", "runner-a");
    let b = policy.project("proj-b", "group/b", "20", "runner-b");
    assert_eq!(get(&b), 200);
    policy.rewrite(&runners(), "the runners reload");
    assert_eq!(get(&a), 200);
    assert_eq!(get(&b), 404);
    let reasons = refusals(&policy.bed, "proj-b");
    assert!(
        reasons
            .iter()
            .any(|r| r == &format!("runner runner-b is not listed in {}", policy.path_str())),
        "{reasons:?}"
    );
    assert_real_imds_untouched(&policy.bed);
}
