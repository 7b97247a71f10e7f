//! The container-credentials endpoint (ECS and EKS style), through the
//! AWS SDK.

use metaproxy_tests::bed::{E2eBed, ROLE_DEPLOY};
use serde_json::Value;

use crate::{assert_real_imds_untouched, refusals, refusals_and_unauthorized, CREDS};

#[test]
fn the_sdk_gets_its_role_from_the_container_credentials_endpoint_one_request_per_load() {
    let bed = E2eBed::start(&[]).expect("bed");
    for (name, var, uri) in [
        (
            "ecs-relative",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "/v1/credentials",
        ),
        (
            "eks-full",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "http://169.254.170.23/v1/credentials",
        ),
    ] {
        let got = bed
            .sdk_client(
                name,
                bed.base_image(),
                &[("IAM_ROLE", ROLE_DEPLOY), (var, uri)],
                &[],
                1,
            )
            .unwrap();
        assert_eq!(got["ok"], true, "{name}: {got}");
        let arn = got["arns"][0].as_str().unwrap();
        assert!(
            arn.starts_with(&format!(
                "arn:aws:sts::123456789012:assumed-role/{ROLE_DEPLOY}/"
            )),
            "{name}: {arn}"
        );
        // One request per credential load: no token PUT, no role listing.
        // The client loads credentials twice (the STS client's identity
        // cache, then its own report of the key id), so two GETs; through
        // IMDS the same run takes six requests.
        let requests: Vec<Value> = bed
            .daemon
            .connections()
            .unwrap()
            .into_iter()
            .filter(|c| c["container"] == name)
            .collect();
        assert_eq!(requests.len(), 2, "{name}: {requests:?}");
        for r in &requests {
            assert_eq!(r["request"], "GET /v1/credentials", "{r}");
            assert_eq!(r["outcome"], "served", "{r}");
        }
        let dst = if name == "eks-full" {
            "169.254.170.23:80"
        } else {
            "169.254.170.2:80"
        };
        assert_eq!(requests[0]["original_dst"], dst);
    }
    // Without a role: the SDK gets the endpoint's error, never the
    // instance's credentials.
    let bare = bed
        .sdk_client(
            "ecs-bare",
            bed.base_image(),
            &[("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v1/credentials")],
            &[],
            1,
        )
        .unwrap();
    assert_eq!(bare["ok"], false, "{bare}");
    assert!(
        !bare.to_string().contains("metaproxy-instance-role"),
        "{bare}"
    );
    let refused = refusals_and_unauthorized(&bed, "ecs-bare");
    assert!(!refused.is_empty());
    // A role, but the runner did not turn the endpoint on: nothing here
    // (IMDS still serves it), and the admin is told why.
    let not_asked = bed
        .container(
            "ecs-not-asked",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &[],
        )
        .unwrap();
    let got = not_asked.raw("169.254.170.2:80", "GET", "/v1/credentials", &[]);
    assert_eq!(got["status"], 404, "{got}");
    assert!(
        got["body"].as_str().unwrap().contains("\"NotEnabled\""),
        "{got}"
    );
    assert!(
        refusals(&bed, "ecs-not-asked")
            .iter()
            .any(|r| r.contains("the runner did not turn the container-credentials endpoint on")),
        "{:?}",
        refusals(&bed, "ecs-not-asked")
    );
    let token = not_asked.token_header(60);
    assert_eq!(
        not_asked.imds("GET", &format!("{CREDS}{ROLE_DEPLOY}"), &[&token])["status"],
        200
    );
    assert_eq!(
        bed.daemon
            .metric("metaproxy_requests_total{route=\"container-credentials\",outcome=\"served\"}"),
        4.0
    );
    assert_real_imds_untouched(&bed);
}

#[test]
fn where_the_instance_requires_imdsv2_the_endpoint_takes_only_the_runners_token() {
    let bed = E2eBed::start_requiring_tokens(&[]).expect("bed");
    let opt_in = ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v1/credentials");
    // The SDK sends the runner's AWS_CONTAINER_AUTHORIZATION_TOKEN itself.
    let with_token = bed
        .sdk_client(
            "ecs-token",
            bed.base_image(),
            &[
                ("IAM_ROLE", ROLE_DEPLOY),
                opt_in,
                ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "runner-set-s3cret"),
            ],
            &[],
            1,
        )
        .unwrap();
    assert_eq!(with_token["ok"], true, "{with_token}");
    // Without one, the endpoint gives nothing (a request forged through a
    // job's service could reach it as easily).
    let c = bed
        .container(
            "ecs-no-token",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY), opt_in],
            &[],
        )
        .unwrap();
    let got = c.raw("169.254.170.2:80", "GET", "/v1/credentials", &[]);
    assert_eq!(got["status"], 401, "{got}");
    assert!(!got.to_string().contains("ASIA"), "{got}");
    let reasons = refusals_and_unauthorized(&bed, "ecs-no-token");
    assert!(
        reasons.iter().any(|r| r.contains(
            "the runner set no AWS_CONTAINER_AUTHORIZATION_TOKEN for this container, which the endpoint requires here (the instance requires IMDSv2)"
        )),
        "{reasons:?}"
    );
    let log = bed.daemon.log();
    assert!(
        !log.contains("runner-set-s3cret"),
        "the token reached a log"
    );
    assert_real_imds_untouched(&bed);
}
