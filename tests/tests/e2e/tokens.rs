//! IMDSv2 tokens: bound to their container, kept across restarts.

use metaproxy_tests::bed::{E2eBed, ROLE_DEPLOY};

use crate::{assert_real_imds_untouched, CREDS};

#[test]
fn a_token_minted_for_one_container_is_refused_in_another() {
    let bed = E2eBed::start(&[]).expect("bed");
    let a = bed
        .container(
            "token-a",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &[],
        )
        .unwrap();
    let b = bed
        .container(
            "token-b",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &[],
        )
        .unwrap();
    let token = a.token_header(300);
    assert_eq!(a.imds("GET", CREDS, &[&token])["status"], 200);
    assert_eq!(b.imds("GET", CREDS, &[&token])["status"], 401);
    let unauthorized = bed
        .daemon
        .connections()
        .unwrap()
        .into_iter()
        .filter(|c| c["outcome"] == "unauthorized")
        .count();
    assert_eq!(unauthorized, 1);
}

#[test]
fn tokens_and_containers_survive_a_daemon_restart_and_a_container_restart() {
    let mut bed = E2eBed::start(&[]).expect("bed");
    let c = bed
        .container(
            "holder",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &[],
        )
        .unwrap();
    let token = c.token_header(21600);
    assert_eq!(c.imds("GET", CREDS, &[&token])["status"], 200);

    bed.daemon.restart().unwrap();
    assert_eq!(
        c.imds("GET", CREDS, &[&token])["body"],
        ROLE_DEPLOY,
        "token held across the restart"
    );
    assert_eq!(c.exec(&["/mp-sdk-client"]).unwrap()["ok"], true);

    // `docker restart` gives the container a new cgroup; it is still known.
    bed.dockerd
        .docker(&["restart", "-t", "0", "holder"])
        .unwrap();
    assert_eq!(c.imds("GET", CREDS, &[&token])["body"], ROLE_DEPLOY);
    assert_real_imds_untouched(&bed);
}
