//! End to end on the real parts: the kernel probe, a private dockerd, moto
//! as STS with auth on, the AWS SDK for Rust inside containers. Only EC2's
//! metadata service is faked, and it records every caller: no container may
//! ever reach it.

use metaproxy_tests::bed::{role_arn, E2eBed, ROLE_BUILD, ROLE_DEPLOY};

fn assumed(role: &str, session_prefix: &str, arn: &str) -> bool {
    arn.starts_with(&format!(
        "arn:aws:sts::123456789012:assumed-role/{role}/{session_prefix}"
    ))
}

#[test]
fn a_container_with_an_allowed_role_gets_that_role_and_one_without_gets_nothing() {
    let bed = E2eBed::start(&[]).expect("bed");
    let with = bed
        .sdk_client(
            "with-role",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            1,
        )
        .unwrap();
    assert_eq!(with["ok"], true, "{with}");
    let arn = with["arns"][0].as_str().unwrap();
    assert!(assumed(ROLE_DEPLOY, "container-", arn), "{arn}");

    let without = bed.sdk_client("no-role", bed.base_image(), &[], 1).unwrap();
    assert_eq!(without["ok"], false, "{without}");
    assert!(without["arns"].as_array().unwrap().is_empty());

    let conns = bed.daemon.connections().unwrap();
    assert!(
        conns.iter().any(|c| c["container"] == "with-role"
            && c["role"] == role_arn(ROLE_DEPLOY)
            && c["outcome"] == "served"),
        "{conns:#?}"
    );
    assert!(
        conns
            .iter()
            .any(|c| c["container"] == "no-role" && c["outcome"] == "no-role"),
        "{conns:#?}"
    );
    assert!(
        bed.container_calls_to_real_imds().is_empty(),
        "a container reached the real IMDS"
    );
    let _ = ROLE_BUILD;
}
