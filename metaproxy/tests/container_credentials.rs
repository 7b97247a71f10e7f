//! The container-credentials endpoint (what SDKs read through
//! `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`/`_FULL_URI`), in-process: one
//! request, no token, attributed by cgroup like IMDS; only for containers
//! whose runner turned it on; the runner's token where IMDSv2 is required;
//! ECS-shaped errors; never anything for a caller without a role.

mod support;

use metaproxy::ops::{connlog::Outcome, metrics::RouteLabel};
use support::{bed, bed_with, with_role, Spec, StsMode};

const ECS: [u8; 4] = [169, 254, 170, 2];
const EKS: [u8; 4] = [169, 254, 170, 23];
const PATH: &str = "/v1/credentials";
/// How the runner turns the endpoint on (its `environment`).
const OPT_IN: &str = "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v1/credentials";

/// A job whose runner set `IAM_ROLE=ci-deploy` and turned the endpoint on.
fn opted_in() -> Spec<'static> {
    Spec {
        env: &["IAM_ROLE=ci-deploy", OPT_IN],
        ..Default::default()
    }
}

#[tokio::test]
async fn one_request_without_a_token_gets_the_containers_role() {
    let bed = bed().await;
    let job = bed.container(1, opted_in());
    for dst in [ECS, EKS] {
        let got = bed.request(&job.to(dst), "GET", PATH, &[]).await;
        assert_eq!(got.status, 200, "{got:?}");
        assert_eq!(got.header("content-type"), Some("application/json"));
        let doc = got.json();
        assert!(doc["AccessKeyId"].as_str().unwrap().starts_with("ASIAFAKE"));
        assert!(doc["SecretAccessKey"]
            .as_str()
            .unwrap()
            .starts_with("secret-"));
        assert!(doc["Token"].as_str().unwrap().starts_with("token-"));
        let exp = doc["Expiration"].as_str().unwrap();
        assert!(exp.len() == 20 && exp.ends_with('Z'), "{exp}");
        assert_eq!(doc["AccountId"], support::ACCOUNT);
        assert_eq!(
            doc["RoleArn"],
            format!("arn:aws:iam::{}:role/ci-deploy", support::ACCOUNT)
        );
        let logged = bed.last_log();
        assert_eq!(logged.outcome, Outcome::Served);
        assert_eq!(
            logged.original_dst.as_deref(),
            Some(&*format!("{}.{}.{}.{}:80", dst[0], dst[1], dst[2], dst[3]))
        );
    }
    // An Authorization header (as EKS Pod Identity sends) is accepted.
    let got = bed
        .request(&job.to(ECS), "GET", PATH, &[("Authorization", "anything")])
        .await;
    assert_eq!(got.status, 200);
    assert_eq!(bed.sts.calls(), 1, "one session, cached");
    assert_eq!(
        bed.metrics
            .requests_of(RouteLabel::ContainerCredentials, Outcome::Served),
        3
    );
}

#[tokio::test]
async fn refusals_take_the_ecs_agents_error_shape_and_give_nothing() {
    let bed = bed().await;
    let job = bed.container(1, opted_in());
    let bare = bed.container(
        2,
        Spec {
            env: &[OPT_IN],
            ..Default::default()
        },
    );
    let cases = [
        (bare.to(ECS), "GET", PATH, vec![], 404, "NoRole"),
        (
            job.to(ECS),
            "GET",
            "/v2/credentials",
            vec![],
            404,
            "NotFound",
        ),
        (
            job.to(ECS),
            "GET",
            "/v1/credentials?x=1",
            vec![],
            404,
            "NotFound",
        ),
        (
            job.to(ECS),
            "GET",
            "/latest/meta-data/iam/security-credentials/",
            vec![],
            404,
            "NotFound",
        ),
        (job.to(ECS), "POST", PATH, vec![], 405, "MethodNotAllowed"),
        (
            job.to(ECS),
            "GET",
            PATH,
            vec![("X-Forwarded-For", "10.0.0.1")],
            403,
            "AccessDenied",
        ),
    ];
    for (who, method, path, headers, status, code) in cases {
        let got = bed.request(&who, method, path, &headers).await;
        assert_eq!(got.status, status, "{method} {path}: {got:?}");
        assert_eq!(got.json()["code"], code, "{got:?}");
        assert!(!got.body.contains("ASIA"), "{got:?}");
    }
    // The IMDS address does not serve the container-credentials path.
    let imds = bed.request(&job, "GET", PATH, &[]).await;
    assert_eq!(imds.status, 404);
    // A host process gets nothing here, and nothing is passed through.
    let host = bed.process_at("/system.slice/ssm.service", "amazon-ssm-agent");
    let got = bed.request(&host.to(ECS), "GET", PATH, &[]).await;
    assert_eq!(
        (got.status, got.json()["code"].as_str()),
        (404, Some("NotFound"))
    );
    assert!(bed.upstream.forwards.lock().unwrap().is_empty());
    assert_eq!(bed.sts.calls(), 0);
    // STS failing: 503, which SDKs retry.
    bed.sts.set(StsMode::Fail);
    let got = bed.request(&job.to(ECS), "GET", PATH, &[]).await;
    assert_eq!(got.status, 503, "{got:?}");
    assert_eq!(got.json()["code"], "CredentialsUnavailable");
    assert!(
        bed.last_log().reason.unwrap().contains("AccessDenied"),
        "the reason stays in the log"
    );
}

#[tokio::test]
async fn a_required_authorization_must_be_the_runners_token_for_this_container() {
    let bed = bed_with(&["--container-credentials-require-auth"]).await;
    let job = bed
        .container(
            1,
            Spec {
                env: &[
                    "IAM_ROLE=ci-deploy",
                    "AWS_CONTAINER_AUTHORIZATION_TOKEN=s3cret",
                    OPT_IN,
                ],
                ..Default::default()
            },
        )
        .to(ECS);
    let other = bed
        .container(
            2,
            Spec {
                env: &[
                    "IAM_ROLE=ci-deploy",
                    "AWS_CONTAINER_AUTHORIZATION_TOKEN=other",
                    OPT_IN,
                ],
                ..Default::default()
            },
        )
        .to(ECS);
    let from_image = bed
        .container(
            3,
            Spec {
                env: &["IAM_ROLE=ci-deploy", OPT_IN],
                image_env: &["AWS_CONTAINER_AUTHORIZATION_TOKEN=s3cret"],
                ..Default::default()
            },
        )
        .to(ECS);
    for (who, auth, status) in [
        (&job, None, 401),
        (&job, Some("wrong"), 401),
        (&job, Some("other"), 401),
        (&job, Some("s3cret"), 200),
        (&other, Some("s3cret"), 401),
        (&from_image, Some("s3cret"), 401),
    ] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let got = bed.request(who, "GET", PATH, &headers).await;
        assert_eq!(got.status, status, "{auth:?}: {got:?}");
        if status == 401 {
            assert_eq!(got.json()["code"], "Unauthorized");
            assert_eq!(bed.last_log().outcome, Outcome::Unauthorized);
        }
    }
}

#[tokio::test]
async fn the_endpoint_answers_only_containers_whose_runner_turned_it_on() {
    let bed = bed().await;
    // Before, every container with a role got credentials here: a route
    // around IMDSv2 that nobody chose.
    let not_asked = bed.container(1, with_role());
    let image_only = bed.container(
        2,
        Spec {
            env: &["IAM_ROLE=ci-deploy", OPT_IN],
            image_env: &[OPT_IN],
            ..Default::default()
        },
    );
    let twice = bed.container(
        3,
        Spec {
            env: &[
                "IAM_ROLE=ci-deploy",
                OPT_IN,
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/other",
            ],
            ..Default::default()
        },
    );
    let full = bed.container(
        4,
        Spec {
            env: &[
                "IAM_ROLE=ci-deploy",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI=http://169.254.170.23/v1/credentials",
            ],
            ..Default::default()
        },
    );
    for (who, why) in [
        (
            &not_asked,
            "the runner did not turn the container-credentials endpoint on for this container",
        ),
        (
            &image_only,
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI comes from the image's ENV",
        ),
        (
            &twice,
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI is set more than once with different values",
        ),
    ] {
        let got = bed.request(&who.to(ECS), "GET", PATH, &[]).await;
        assert_eq!(got.status, 404, "{got:?}");
        assert_eq!(got.json()["code"], "NotEnabled", "{got:?}");
        assert!(!got.body.contains("ASIA"), "{got:?}");
        let logged = bed.last_log();
        assert_eq!(logged.outcome, Outcome::Refused);
        assert!(logged.reason.unwrap().contains(why), "{why}");
    }
    assert_eq!(bed.sts.calls(), 0, "nothing assumed for them");
    assert_eq!(
        bed.request(&full.to(EKS), "GET", PATH, &[]).await.status,
        200
    );
    // IMDS still serves the role of a container that did not opt in.
    let token = bed.token(&not_asked).await;
    let imds = bed
        .request(
            &not_asked,
            "GET",
            "/latest/meta-data/iam/security-credentials/ci-deploy",
            &[("X-aws-ec2-metadata-token", &token)],
        )
        .await;
    assert_eq!(imds.status, 200, "{imds:?}");
    assert_eq!(
        bed.metrics
            .requests_of(RouteLabel::ContainerCredentials, Outcome::Refused),
        3
    );
}

#[tokio::test]
async fn where_the_instance_requires_imdsv2_the_endpoint_requires_the_runners_token() {
    let bed = bed().await;
    bed.upstream
        .requires_tokens
        .store(true, std::sync::atomic::Ordering::SeqCst);
    bed.imdsv1.check(bed.upstream.as_ref()).await;
    let with_token = bed
        .container(
            1,
            Spec {
                env: &[
                    "IAM_ROLE=ci-deploy",
                    OPT_IN,
                    "AWS_CONTAINER_AUTHORIZATION_TOKEN=s3cret",
                ],
                ..Default::default()
            },
        )
        .to(ECS);
    let without = bed.container(2, opted_in()).to(ECS);
    // A request forged through the job's service (SSRF) carries no header.
    for (who, auth, status, why) in [
        (&with_token, None, 401, "Authorization header missing"),
        (&with_token, Some("guess"), 401, "Authorization header missing"),
        (&with_token, Some("s3cret"), 200, ""),
        (
            &without,
            None,
            401,
            "the runner set no AWS_CONTAINER_AUTHORIZATION_TOKEN for this container, which the endpoint requires here (the instance requires IMDSv2)",
        ),
        (&without, Some("anything"), 401, "the runner set no"),
    ] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let got = bed.request(who, "GET", PATH, &headers).await;
        assert_eq!(got.status, status, "{auth:?}: {got:?}");
        if status == 401 {
            assert_eq!(got.json()["code"], "Unauthorized");
            let logged = bed.last_log();
            assert_eq!(logged.outcome, Outcome::Unauthorized);
            let reason = logged.reason.unwrap();
            assert!(reason.contains(why), "{reason}");
            assert!(!reason.contains("s3cret"), "{reason}");
        }
    }
    // Once the instance takes IMDSv1 again, so does the endpoint.
    bed.upstream
        .requires_tokens
        .store(false, std::sync::atomic::Ordering::SeqCst);
    bed.imdsv1.check(bed.upstream.as_ref()).await;
    assert_eq!(bed.request(&without, "GET", PATH, &[]).await.status, 200);
}
