//! Jobs' GitLab ID tokens on the real parts: a fake GitLab issuer in the
//! bed (discovery, JWKS, RS256 tokens with GitLab's claims), moto's
//! AssumeRoleWithWebIdentity (which checks no token: the daemon's
//! verification is what is on trial; its recorder shows each call and the
//! token), the AWS SDK in containers.

use std::time::Duration;

use metaproxy_tests::{
    bed::{job_label, role_arn, Container, E2eBed, ROLE_DEPLOY},
    gitlab::FakeGitlab,
    scratch::ScratchDir,
    wait_for,
};
use serde_json::{json, Value};

use crate::{assert_real_imds_untouched, is_assumed, refusals, CREDS};

fn gitlab(bed: &E2eBed) -> &FakeGitlab {
    bed.gitlab.as_ref().expect("a bed with a GitLab issuer")
}

fn field(form: &[(String, String)], key: &str) -> String {
    form.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// moto's AssumeRoleWithWebIdentity calls for job `job`: (role, token,
/// whether the request was signed).
fn web_identity_calls(bed: &E2eBed, job: &str) -> Vec<(String, String, bool)> {
    bed.moto
        .requests("AssumeRoleWithWebIdentity")
        .into_iter()
        .filter(|(form, _)| field(form, "RoleSessionName") == format!("gitlab-job-{job}"))
        .map(|(form, headers)| {
            let signed = headers
                .as_object()
                .is_some_and(|h| h.keys().any(|k| k.eq_ignore_ascii_case("authorization")));
            (
                field(&form, "RoleArn"),
                field(&form, "WebIdentityToken"),
                signed,
            )
        })
        .collect()
}

fn assume_role_calls(bed: &E2eBed, job: &str) -> usize {
    bed.moto
        .assume_role_calls()
        .into_iter()
        .filter(|(_, session)| *session == format!("gitlab-job-{job}"))
        .count()
}

#[test]
fn the_sdk_with_its_jobs_id_token_gets_the_role_by_web_identity_on_both_surfaces_and_no_log_holds_the_token(
) {
    let bed = E2eBed::start_with_id_tokens(&[], &[("METAPROXY_LOG", "trace")], true).expect("bed");
    for (name, job, surface) in [
        ("wi-imds", "4101", None),
        (
            "wi-endpoint",
            "4102",
            Some((
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "http://169.254.170.23/v1/credentials",
            )),
        ),
    ] {
        let token = gitlab(&bed).mint("a", &FakeGitlab::claims(job, json!({})));
        let mut env = vec![("IAM_ROLE", ROLE_DEPLOY), ("AWS_ID_TOKEN", token.as_str())];
        env.extend(surface);
        let got = bed
            .sdk_client(
                name,
                bed.base_image(),
                &env,
                &["--label", &job_label(job)],
                1,
            )
            .unwrap();
        assert_eq!(got["ok"], true, "{name}: {got}\n{}", bed.daemon.log());
        let arn = got["arns"][0].as_str().unwrap();
        assert!(
            is_assumed(ROLE_DEPLOY, &format!("gitlab-job-{job}"), arn),
            "{name}: {arn}"
        );
        // The daemon asked STS with the job's own token, unsigned, and
        // never with the instance profile.
        let calls = web_identity_calls(&bed, job);
        assert!(!calls.is_empty(), "{name}: no AssumeRoleWithWebIdentity");
        for (role, presented, signed) in &calls {
            assert_eq!(role, &role_arn(ROLE_DEPLOY));
            assert_eq!(presented, &token, "{name}: another token reached STS");
            assert!(!signed, "{name}: the call carried the daemon's signature");
        }
        assert_eq!(
            assume_role_calls(&bed, job),
            0,
            "{name}: AssumeRole was used"
        );
    }
    assert!(
        bed.daemon
            .metric(r#"metaproxy_sts_calls_total{operation="AssumeRoleWithWebIdentity"}"#)
            >= 2.0
    );
    let log = bed.daemon.log();
    assert!(
        log.lines()
            .any(|l| l.contains("credentials issued") && l.contains("web-identity")),
        "the audit line names the source:\n{log}"
    );
    // At trace level, nothing the daemon wrote holds a token, or even its
    // signature.
    for job in ["4101", "4102"] {
        for (_, token, _) in web_identity_calls(&bed, job) {
            let signature = token.rsplit('.').next().unwrap();
            assert!(
                !log.contains(signature),
                "the daemon logged job {job}'s token"
            );
        }
    }
    assert_real_imds_untouched(&bed);
}

/// A bed whose jobs carry ID tokens and whose policy file admits only
/// `group/app`'s protected production deployments. The policy's directory
/// goes after the bed (fields drop in order).
struct ProductionOnly {
    bed: E2eBed,
    _policy: ScratchDir,
}

impl ProductionOnly {
    fn start() -> Self {
        let dir = ScratchDir::new("mpt").unwrap();
        let policy = dir.join("policy.toml");
        std::fs::write(
            &policy,
            "[[rule]]\nroles = [\"arn:aws:iam::123456789012:role/ci-*\"]\nprojects = [\"group/app\"]\nprotected = true\nenvironments = [\"production\"]\nenvironment_protected = true\n",
        )
        .unwrap();
        let bed =
            E2eBed::start_with_id_tokens(&["--policy-file", policy.to_str().unwrap()], &[], true)
                .expect("bed");
        Self { bed, _policy: dir }
    }
}

/// GitLab's claims for `job` deploying to protected production, with
/// `extra` claims in place of its own.
fn production_claims(job: &str, extra: Value) -> Value {
    let mut c = FakeGitlab::claims(
        job,
        json!({"environment": "production", "environment_protected": "true"}),
    );
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

/// A refused token: container name, job id, the token, more variables, and
/// what the reason must say.
type Case<'a> = (&'a str, &'a str, String, Vec<(&'a str, &'a str)>, &'a str);

/// Runs `case`'s container with its token and asserts that it gets
/// nothing, for the reason it says, and that the daemon asked STS
/// nothing for its job. The container is kept for the caller.
fn assert_refused(bed: &E2eBed, (name, job, token, extra_env, why): &Case) -> Container {
    let mut env = vec![("IAM_ROLE", ROLE_DEPLOY), ("AWS_ID_TOKEN", token.as_str())];
    env.extend(extra_env.iter().copied());
    let c = bed
        .container(name, bed.base_image(), &env, &["--label", &job_label(job)])
        .unwrap();
    let got = c.imds("GET", &format!("{CREDS}{ROLE_DEPLOY}"), &[]);
    assert_eq!(got["status"], 404, "{name}: {got}");
    let reasons = refusals(bed, name);
    assert!(
        reasons.iter().any(|r| r.contains(why)),
        "{name}: {reasons:?}"
    );
    assert!(
        reasons.iter().all(|r| !r.contains(token.as_str())),
        "{name}: a reason quotes the token"
    );
    assert!(web_identity_calls(bed, job).is_empty(), "{name}");
    assert_eq!(
        assume_role_calls(bed, job),
        0,
        "{name}: fell back to AssumeRole"
    );
    c
}

#[test]
fn a_token_that_fails_any_check_gets_nothing() {
    let production = ProductionOnly::start();
    let bed = &production.bed;
    let gl = gitlab(bed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let cases: Vec<Case> = vec![
        (
            "wi-expired",
            "4201",
            gl.mint(
                "a",
                &production_claims(
                    "4201",
                    json!({"iat": now - 4000, "nbf": now - 4000, "exp": now - 600}),
                ),
            ),
            vec![],
            "the ID token expired at",
        ),
        (
            "wi-audience",
            "4202",
            gl.mint(
                "a",
                &production_claims("4202", json!({"aud": "https://vault.example.com"})),
            ),
            vec![],
            "the ID token's audience is not sts.amazonaws.com",
        ),
        (
            "wi-rogue-key",
            "4203",
            gl.mint("rogue", &production_claims("4203", json!({}))),
            vec![],
            "signed by key \"key-rogue\", which is not in the issuer's JWKS",
        ),
        (
            "wi-rogue-under-kid",
            "4204",
            gl.mint_as("rogue", "key-a", &production_claims("4204", json!({}))),
            vec![],
            "signature does not verify",
        ),
        (
            "wi-issuer",
            "4205",
            gl.mint(
                "a",
                &production_claims("4205", json!({"iss": "https://gitlab.other.example"})),
            ),
            vec![],
            "from issuer \"https://gitlab.other.example\"",
        ),
        (
            "wi-other-job",
            "4206",
            gl.mint("a", &production_claims("999999", json!({}))),
            vec![],
            "the ID token is for job 999999, but this container belongs to job 4206",
        ),
    ];
    for case in &cases {
        assert_refused(bed, case);
    }
    assert_real_imds_untouched(bed);
}

#[test]
fn the_claims_not_the_variables_meet_the_policy() {
    let production = ProductionOnly::start();
    let bed = &production.bed;
    let gl = gitlab(bed);
    let cases: Vec<Case> = vec![
        (
            // The job writes the runner's variables for the project the
            // rule allows; its token is for another: the claim wins.
            "wi-forged-path",
            "4207",
            gl.mint(
                "a",
                &production_claims("4207", json!({"project_path": "group/other"})),
            ),
            vec![("CI_PROJECT_PATH", "group/app"), ("CI_PROJECT_ID", "20")],
            "project group/other (id 20)",
        ),
        (
            "wi-staging",
            "4208",
            gl.mint(
                "a",
                &production_claims("4208", json!({"environment": "staging"})),
            ),
            vec![],
            "ref type branch, environment staging (protected)",
        ),
        (
            "wi-unprotected",
            "4209",
            gl.mint(
                "a",
                &production_claims("4209", json!({"ref_protected": "false"})),
            ),
            vec![],
            "on ref main (not protected)",
        ),
    ];
    // Kept until the end, for `policy explain`.
    let _alive: Vec<Container> = cases.iter().map(|c| assert_refused(bed, c)).collect();
    // The same claims on production, protected: served.
    let token = gl.mint("a", &production_claims("4210", json!({})));
    let c = bed
        .container(
            "wi-production",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY), ("AWS_ID_TOKEN", &token)],
            &["--label", &job_label("4210")],
        )
        .unwrap();
    let got = c.imds("GET", &format!("{CREDS}{ROLE_DEPLOY}"), &[]);
    assert_eq!(got["status"], 200, "{got}\n{}", bed.daemon.log());
    assert_eq!(web_identity_calls(bed, "4210").len(), 1);
    // `policy explain` says where the facts came from.
    let explained = bed
        .daemon
        .admin_command(&["policy", "explain", "wi-forged-path"])
        .output()
        .unwrap();
    assert!(explained.status.success(), "{explained:?}");
    let explained = String::from_utf8_lossy(&explained.stdout);
    assert!(
        explained.contains("from the job's verified ID token"),
        "{explained}"
    );
    assert_real_imds_untouched(bed);
}

#[test]
fn a_rotated_key_is_taken_on_first_sight_and_made_up_key_ids_do_not_hammer_the_issuer() {
    let bed = E2eBed::start_with_id_tokens(&[], &[], true).expect("bed");
    let gl = gitlab(&bed);
    let by_b = gl.mint("b", &FakeGitlab::claims("4301", json!({})));
    let env = [("IAM_ROLE", ROLE_DEPLOY), ("AWS_ID_TOKEN", by_b.as_str())];
    let early = bed
        .container(
            "wi-before",
            bed.base_image(),
            &env,
            &["--label", &job_label("4301")],
        )
        .unwrap();
    assert_eq!(
        early.imds("GET", &format!("{CREDS}{ROLE_DEPLOY}"), &[])["status"],
        404
    );
    assert!(refusals(&bed, "wi-before")
        .iter()
        .any(|r| r.contains("\"key-b\", which is not in the issuer's JWKS")));
    // Ten tokens under made-up key ids at once cost at most one fetch.
    let before = gl.jwks_fetches();
    for i in 0..10 {
        let forged = gl.mint_as(
            "rogue",
            &format!("made-up-{i}"),
            &FakeGitlab::claims("4302", json!({})),
        );
        let c = bed
            .container(
                &format!("wi-made-up-{i}"),
                bed.base_image(),
                &[("IAM_ROLE", ROLE_DEPLOY), ("AWS_ID_TOKEN", &forged)],
                &["--label", &job_label("4302")],
            )
            .unwrap();
        assert_eq!(
            c.imds("GET", &format!("{CREDS}{ROLE_DEPLOY}"), &[])["status"],
            404
        );
    }
    let fetched = gl.jwks_fetches() - before;
    assert!(
        fetched <= 3,
        "{fetched} JWKS fetches for ten unknown key ids"
    );
    // GitLab rotates to b; once the refetch pause (5 s after the last
    // fetch) is over, b's tokens work. Until then the daemon refuses them
    // without asking GitLab or STS, so asking again is harmless.
    gl.publish(&["a", "b"]);
    let after = bed
        .container(
            "wi-after",
            bed.base_image(),
            &env,
            &["--label", &job_label("4301")],
        )
        .unwrap();
    let mut got = Value::Null;
    let taken = wait_for("key b taken", Duration::from_secs(20), || {
        got = after.imds("GET", &format!("{CREDS}{ROLE_DEPLOY}"), &[]);
        (got["status"] == 200).then_some(())
    });
    if let Err(e) = taken {
        panic!("{e}: {got}\n{}", bed.daemon.log());
    }
    assert_eq!(got["status"], 200, "{got}\n{}", bed.daemon.log());
    assert_eq!(web_identity_calls(&bed, "4301").len(), 1);
}

#[test]
fn with_tokens_required_a_daemon_without_credentials_of_its_own_serves_tokens_and_nothing_else() {
    let bed = E2eBed::start_with_id_tokens(&["--oidc-required"], &[], false).expect("bed");
    // No instance profile: IAM_ROLE names the role by ARN.
    let arn = role_arn(ROLE_DEPLOY);
    let token = gitlab(&bed).mint("a", &FakeGitlab::claims("4401", json!({})));
    let got = bed
        .sdk_client(
            "wi-required",
            bed.base_image(),
            &[("IAM_ROLE", &arn), ("AWS_ID_TOKEN", &token)],
            &["--label", &job_label("4401")],
            1,
        )
        .unwrap();
    assert_eq!(got["ok"], true, "{got}\n{}", bed.daemon.log());
    assert!(is_assumed(
        ROLE_DEPLOY,
        "gitlab-job-4401",
        got["arns"][0].as_str().unwrap()
    ));
    // A job without a token gets nothing, and the reason says so.
    let c = bed
        .container(
            "wi-no-token",
            bed.base_image(),
            &[("IAM_ROLE", &arn)],
            &["--label", &job_label("4402")],
        )
        .unwrap();
    assert_eq!(
        c.imds("GET", &format!("{CREDS}{ROLE_DEPLOY}"), &[])["status"],
        404
    );
    assert!(refusals(&bed, "wi-no-token")
        .iter()
        .any(|r| r.contains("--oidc-required: the container has no ID token in AWS_ID_TOKEN")));
    // The daemon never had credentials, and never made an AssumeRole.
    assert!(!bed.daemon.log().contains("instance credentials work"));
    assert!(bed
        .moto
        .assume_role_calls()
        .iter()
        .all(|(_, s)| !s.starts_with("gitlab-job-")));
    let (status, body) = bed.daemon.metrics_get("/readyz").unwrap();
    assert_eq!(status, 200, "{body}");
    assert_real_imds_untouched(&bed);
}
