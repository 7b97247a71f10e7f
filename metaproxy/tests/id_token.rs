//! Jobs' GitLab ID tokens through the whole request path in-process: a
//! valid token buys the runner's role with AssumeRoleWithWebIdentity and
//! nothing else does; refusals and STS's errors land in the reason and the
//! metrics. (The real parts, moto and the AWS SDK in containers, are in the
//! root e2e suite.)

mod support;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures_util::{future::BoxFuture, FutureExt as _};
use jsonwebtoken::{jwk::JwkSet, Algorithm, EncodingKey, Header};
use metaproxy::{identity::id_token::KeySource, ops::connlog::Outcome};
use support::{bed_with_keys, Spec, StsMode};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/ci-deploy";
const ISSUER: &str = "https://gitlab.example.com";

struct Keys;

impl KeySource for Keys {
    fn fetch(&self) -> BoxFuture<'_, Result<JwkSet, String>> {
        async {
            Ok(serde_json::from_str(include_str!(
                "../src/identity/id_token/testdata/jwks-a.json"
            ))
            .unwrap())
        }
        .boxed()
    }
}

/// A token of job `job` signed with the issuer's key `a`, expiring `ttl`
/// from now (negative: already expired).
fn token(job: usize, ttl: i64) -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = serde_json::json!({
        "iss": ISSUER, "aud": "sts.amazonaws.com",
        "sub": "project_path:group/app:ref_type:branch:ref:main",
        "iat": now.min(now + ttl) - 60, "exp": now + ttl,
        "job_id": job.to_string(), "project_id": "20", "project_path": "group/app",
        "ref": "main", "ref_type": "branch", "ref_protected": "true",
    });
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("key-a".into());
    jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_rsa_pem(include_bytes!("../src/identity/id_token/testdata/a.pem"))
            .unwrap(),
    )
    .unwrap()
}

/// Job container `n` whose runner set `IAM_ROLE=ci-deploy` and whose job
/// carries `jwt`.
fn with_token(bed: &support::Bed, n: usize, jwt: &str) -> support::Who {
    let env = [
        format!("AWS_ID_TOKEN={jwt}"),
        "IAM_ROLE=ci-deploy".to_string(),
    ];
    let env: Vec<&str> = env.iter().map(String::as_str).collect();
    bed.container(
        n,
        Spec {
            env: &env,
            ..Default::default()
        },
    )
}

/// `metaproxy run`'s flags for a GitLab issuer, with `--oidc-required`
/// when `required`.
fn flags(required: bool) -> Vec<&'static str> {
    let mut flags = vec![
        "--allow-role",
        "arn:aws:iam::123456789012:role/ci-*",
        "--oidc-issuer",
        ISSUER,
    ];
    if required {
        flags.push("--oidc-required");
    }
    flags
}

#[tokio::test]
async fn a_valid_token_buys_the_role_with_web_identity_and_never_with_the_instance_profile() {
    let bed = bed_with_keys(&flags(false), Some(Arc::new(Keys))).await;
    let jwt = token(1, 3600);
    let job = with_token(&bed, 1, &jwt);
    let answer = bed.request(&job, "GET", CREDS, &[]).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let calls = bed.sts.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    let web = calls[0]
        .id_token
        .as_ref()
        .expect("AssumeRoleWithWebIdentity");
    assert_eq!(web.token.expose(), jwt);
    assert_eq!(calls[0].session_name, "gitlab-job-1");
    assert_eq!(bed.sts_metrics.calls_of("AssumeRoleWithWebIdentity"), 1);
    assert_eq!(bed.sts_metrics.calls_of("AssumeRole"), 0);
    // The key never prints the token.
    assert!(!format!("{:?}", calls[0]).contains(&jwt));
    // A job without a token on the same runner: AssumeRole, as before.
    let plain = bed.container(
        2,
        Spec {
            env: &["IAM_ROLE=ci-deploy"],
            ..Default::default()
        },
    );
    assert_eq!(bed.request(&plain, "GET", CREDS, &[]).await.status, 200);
    assert_eq!(bed.sts_metrics.calls_of("AssumeRole"), 1);
}

#[tokio::test]
async fn a_bad_token_gets_nothing_and_the_reason_says_why() {
    let bed = bed_with_keys(&flags(false), Some(Arc::new(Keys))).await;
    for (n, jwt, why) in [
        (1, token(1, -600), "the ID token expired at"),
        (
            2,
            token(99, 3600),
            "the ID token is for job 99, but this container belongs to job 2",
        ),
    ] {
        let job = with_token(&bed, n, &jwt);
        assert_eq!(bed.request(&job, "GET", CREDS, &[]).await.status, 404);
        let logged = bed.last_log();
        assert_eq!(logged.outcome, Outcome::Refused);
        let reason = logged.reason.unwrap();
        assert!(reason.contains(why), "{reason}");
        assert!(!reason.contains(&jwt));
    }
    // Neither fell back to AssumeRole.
    assert_eq!(bed.sts.calls(), 0);
}

#[tokio::test]
async fn with_tokens_required_a_job_without_one_gets_nothing() {
    let bed = bed_with_keys(&flags(true), Some(Arc::new(Keys))).await;
    let job = bed.container(
        1,
        Spec {
            env: &["IAM_ROLE=ci-deploy"],
            ..Default::default()
        },
    );
    assert_eq!(bed.request(&job, "GET", CREDS, &[]).await.status, 404);
    let reason = bed.last_log().reason.unwrap();
    assert!(
        reason.contains("--oidc-required: the container has no ID token in AWS_ID_TOKEN"),
        "{reason}"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(bed.sts.calls(), 0, "not even a prefetch");
}

#[tokio::test]
async fn sts_refusing_the_token_lands_in_the_reason_and_the_metrics() {
    let bed = bed_with_keys(&flags(true), Some(Arc::new(Keys))).await;
    bed.sts.set(StsMode::Error("AccessDenied"));
    let jwt = token(1, 3600);
    let job = with_token(&bed, 1, &jwt);
    let answer = bed.request(&job, "GET", CREDS, &[]).await;
    assert_ne!(answer.status, 200);
    let reason = bed.last_log().reason.unwrap();
    assert!(
        reason
            .contains("AssumeRoleWithWebIdentity arn:aws:iam::123456789012:role/ci-deploy failed"),
        "{reason}"
    );
    assert!(
        reason.contains("OIDC provider as Federated principal"),
        "{reason}"
    );
    assert!(
        bed.sts_metrics
            .errors_of("AssumeRoleWithWebIdentity", "AccessDenied")
            >= 1
    );
    // Another job, and STS finds its token invalid: its own code.
    bed.sts.set(StsMode::Error("InvalidIdentityToken"));
    let jwt = token(2, 3600);
    let other = with_token(&bed, 2, &jwt);
    assert_ne!(bed.request(&other, "GET", CREDS, &[]).await.status, 200);
    assert!(bed
        .last_log()
        .reason
        .unwrap()
        .contains("InvalidIdentityToken"));
    assert!(
        bed.sts_metrics
            .errors_of("AssumeRoleWithWebIdentity", "InvalidIdentityToken")
            >= 1
    );
    assert_eq!(bed.sts_metrics.calls_of("AssumeRole"), 0);
}
