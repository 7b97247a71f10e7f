//! The IMDS surface a container sees: tokens, credentials, the metadata
//! passed through and what is never served; IMDSv1 and IMDSv2.

use std::time::Duration;

use metaproxy_tests::{
    bed::{Container, E2eBed, ROLE_BUILD, ROLE_DEPLOY},
    fake_imds::USER_DATA_MARKER,
};
use serde_json::Value;

use crate::{assert_real_imds_untouched, refusals_and_unauthorized, CREDS};

/// The job container every test here asks from: the deploy role.
fn deploy_job(bed: &E2eBed) -> Container {
    bed.container(
        "surface",
        bed.base_image(),
        &[("IAM_ROLE", ROLE_DEPLOY)],
        &[],
    )
    .unwrap()
}

#[test]
fn token_puts_need_a_bounded_ttl_echo_it_and_proxies_and_forged_tokens_are_refused() {
    let bed = E2eBed::start(&[]).expect("bed");
    let c = deploy_job(&bed);
    for bad in [
        vec![],
        vec!["X-aws-ec2-metadata-token-ttl-seconds: 0"],
        vec!["X-aws-ec2-metadata-token-ttl-seconds: 21601"],
    ] {
        assert_eq!(
            c.imds("PUT", "/latest/api/token", &bad)["status"],
            400,
            "{bad:?}"
        );
    }
    let xff = c.imds(
        "PUT",
        "/latest/api/token",
        &[
            "X-aws-ec2-metadata-token-ttl-seconds: 60",
            "X-Forwarded-For: 10.0.0.1",
        ],
    );
    assert_eq!(xff["status"], 403);
    let put = c.imds(
        "PUT",
        "/latest/api/token",
        &["X-aws-ec2-metadata-token-ttl-seconds: 21600"],
    );
    assert_eq!(put["status"], 200);
    assert_eq!(
        put["headers"]["x-aws-ec2-metadata-token-ttl-seconds"],
        "21600"
    );
    assert_eq!(
        c.imds("GET", CREDS, &["X-aws-ec2-metadata-token: forged"])["status"],
        401
    );
    assert_real_imds_untouched(&bed);
}

#[test]
fn credentials_are_served_as_imds_serves_them_and_no_secret_reaches_the_log() {
    let bed = E2eBed::start(&[]).expect("bed");
    let c = deploy_job(&bed);
    let token = c.token_header(21600);
    // The role listing is the bare name: aws-config panics on a newline.
    let listing = c.imds("GET", CREDS, &[&token]);
    assert_eq!(
        (listing["status"].as_u64(), listing["body"].as_str()),
        (Some(200), Some(ROLE_DEPLOY))
    );
    let creds = c.imds("GET", &format!("{CREDS}{ROLE_DEPLOY}"), &[&token]);
    assert_eq!(creds["status"], 200, "{creds}");
    let doc: Value = serde_json::from_str(creds["body"].as_str().unwrap()).unwrap();
    assert_eq!(doc["Code"], "Success");
    assert_eq!(doc["Type"], "AWS-HMAC");
    let expiration = doc["Expiration"].as_str().unwrap();
    assert!(
        expiration.len() == 20 && expiration.ends_with('Z') && !expiration.contains('.'),
        "{expiration}"
    );
    let left = humantime::parse_rfc3339(expiration)
        .unwrap()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(
        left > Duration::from_secs(20 * 60),
        "served credentials with only {left:?} left"
    );
    let extended = c.imds(
        "GET",
        &format!("/latest/meta-data/iam/security-credentials-extended/{ROLE_DEPLOY}"),
        &[&token],
    );
    let ext: Value = serde_json::from_str(extended["body"].as_str().unwrap()).unwrap();
    assert_eq!(ext["AccountId"], "123456789012");
    assert_eq!(ext["AccessKeyId"], doc["AccessKeyId"]);
    assert_eq!(
        c.imds("GET", &format!("{CREDS}metaproxy-instance-role"), &[&token])["status"],
        404
    );
    assert_eq!(
        c.imds("GET", &format!("{CREDS}{ROLE_BUILD}"), &[&token])["status"],
        404
    );
    assert_eq!(
        c.imds("GET", "/latest/meta-data/iam/info", &[&token])["status"],
        200
    );

    // Nothing secret reached the daemon's log.
    let log = bed.daemon.log();
    for secret in [
        doc["SecretAccessKey"].as_str().unwrap(),
        doc["Token"].as_str().unwrap(),
    ] {
        assert!(!log.contains(secret), "a secret reached the log");
    }
    assert_real_imds_untouched(&bed);
}

#[test]
fn malformed_http_gets_a_clear_400_and_imdsv1_is_served_by_default() {
    let bed = E2eBed::start(&[]).expect("bed");
    let c = deploy_job(&bed);
    assert_eq!(c.imds("GET", "/a b", &[])["status"], 400);
    assert_eq!(c.imds("GET", CREDS, &[])["body"], ROLE_DEPLOY);
    assert_real_imds_untouched(&bed);
}

#[test]
fn non_secret_metadata_comes_from_the_real_imds_and_everything_else_is_404() {
    let bed = E2eBed::start(&[]).expect("bed");
    let c = deploy_job(&bed);
    let token = c.token_header(21600);
    let region = c.imds("GET", "/latest/meta-data/placement/region", &[&token]);
    assert_eq!(
        (region["status"].as_u64(), region["body"].as_str()),
        (Some(200), Some("us-east-1"))
    );
    for path in [
        "/latest/user-data",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "/latest/meta-data/iam/security-credentials/../../../user-data",
        "/latest//user-data",
        "/latest/meta-data/%2e%2e/%2e%2e/user-data",
        "/latest/meta-data/placement/region/../../../user-data",
        "/latest/meta-data/placement/regionx",
        "/latest/dynamic/instance-identity/signature",
    ] {
        let got = c.imds("GET", path, &[&token]);
        assert_eq!(got["status"], 404, "{path}: {got}");
        assert!(!got["body"].as_str().unwrap().contains(USER_DATA_MARKER));
    }
    let upstream_paths: Vec<String> = bed
        .imds
        .calls()
        .into_iter()
        .flat_map(|c| c.requests)
        .map(|(_, path, _)| path)
        .collect();
    assert!(
        upstream_paths
            .iter()
            .all(|p| !p.contains("user-data") && !p.contains("identity-credentials")),
        "{upstream_paths:?}"
    );
    assert_real_imds_untouched(&bed);
}

#[test]
fn imdsv1_is_refused_under_require_imdsv2() {
    let bed = E2eBed::start(&["--require-imdsv2"]).expect("bed");
    let c = bed
        .container(
            "v2only",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &[],
        )
        .unwrap();
    assert_eq!(c.imds("GET", CREDS, &[])["status"], 401);
    let sdk = c.exec(&["/mp-sdk-client"]).unwrap();
    assert_eq!(sdk["ok"], true, "aws-config speaks IMDSv2: {sdk}");
}

#[test]
fn imdsv1_mirrors_an_instance_that_requires_imdsv2() {
    let bed = E2eBed::start_requiring_tokens(&[]).expect("bed");
    let c = bed
        .container(
            "mirror",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &[],
        )
        .unwrap();
    // The instance answers a tokenless request with 401; so does metaproxy.
    assert_eq!(c.imds("GET", CREDS, &[])["status"], 401);
    assert!(
        refusals_and_unauthorized(&bed, "mirror")
            .iter()
            .any(|r| r == "IMDSv1 refused (the instance requires IMDSv2)"),
        "{:?}",
        refusals_and_unauthorized(&bed, "mirror")
    );
    let token = c.token_header(60);
    assert_eq!(c.imds("GET", CREDS, &[&token])["body"], ROLE_DEPLOY);
    assert_real_imds_untouched(&bed);
}
