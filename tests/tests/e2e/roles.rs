//! Roles: who gets which role, and who gets none.

use metaproxy_tests::bed::{job_label, role_arn, E2eBed, ROLE_BUILD, ROLE_DEPLOY};
use serde_json::Value;

use crate::{assert_real_imds_untouched, is_assumed, refusals, CREDS};

#[test]
fn a_container_with_an_allowed_role_gets_exactly_that_role_and_one_without_gets_nothing() {
    let bed = E2eBed::start(&[]).expect("bed");
    let label = job_label(4242);
    let with = bed
        .sdk_client(
            "with-role",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &["--label", &label],
            1,
        )
        .unwrap();
    // A probe that failed to redirect would show up here first: the fake
    // real IMDS records every container that reaches it.
    assert_real_imds_untouched(&bed);
    assert_eq!(with["ok"], true, "{with}");
    // The session names the job, from gitlab-runner's label.
    assert!(
        is_assumed(
            ROLE_DEPLOY,
            "gitlab-job-4242",
            with["arns"][0].as_str().unwrap()
        ),
        "{with}"
    );

    let without = bed
        .sdk_client("no-role", bed.base_image(), &[], &[], 1)
        .unwrap();
    assert_eq!(without["ok"], false, "{without}");
    assert!(without["arns"].as_array().unwrap().is_empty());

    let conns = bed.daemon.connections().unwrap();
    let served = conns.iter().find(|c| {
        c["container"] == "with-role" && c["request"] == format!("GET {CREDS}{ROLE_DEPLOY}")
    });
    let served = served.unwrap_or_else(|| panic!("{conns:#?}"));
    assert_eq!(served["role"], role_arn(ROLE_DEPLOY));
    assert_eq!(served["outcome"], "served");
    assert_eq!(served["container_id"].as_str().unwrap().len(), 64);
    assert!(
        conns
            .iter()
            .any(|c| c["container"] == "no-role" && c["outcome"] == "no-role"),
        "{conns:#?}"
    );

    // One audit line per issuance, naming the job and the key, never a
    // secret: the SDK fetched the same credentials twice, which is logged
    // once.
    let log = bed.daemon.log();
    assert_eq!(log.matches("credentials issued").count(), 1, "{log}");
    let audit = log
        .lines()
        .find(|l| l.contains("credentials issued"))
        .expect("audit line");
    for field in [
        "container=with-role",
        "job=4242",
        "session=gitlab-job-4242",
        "access_key_id=ASIA",
        "expiration=",
    ] {
        assert!(audit.contains(field), "audit line lacks {field}: {audit}");
    }
    assert_real_imds_untouched(&bed);
}

#[test]
fn roles_the_runner_did_not_choose_or_the_policy_does_not_allow_get_nothing() {
    let bed =
        E2eBed::start(&["--allow-role", "arn:aws:iam::123456789012:role/ci-d*"]).expect("bed");
    bed.dockerd
        .import_image(
            "mp-image-role:latest",
            &[&format!("ENV IAM_ROLE={ROLE_DEPLOY}")],
        )
        .unwrap();

    // A job variable repeating IAM_ROLE reaches Docker as a second entry
    // (gitlab-runner creates containers through the API, which keeps both).
    let conflicting = bed
        .sdk_client_via_api("conflicting", &["IAM_ROLE=ci-build", "IAM_ROLE=ci-deploy"])
        .unwrap();
    assert_eq!(conflicting["ok"], false, "{conflicting}");
    assert!(
        refusals(&bed, "conflicting")
            .iter()
            .any(|r| r.contains("more than once")),
        "{:?}",
        refusals(&bed, "conflicting")
    );

    // (container, image, environment, what the refusal says)
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: [Case; 3] = [
        ("image-role", "mp-image-role:latest", vec![], "image"),
        (
            "not-allowed",
            bed.base_image(),
            vec![("IAM_ROLE", ROLE_BUILD)],
            "--allow-role",
        ),
        (
            "other-account",
            bed.base_image(),
            vec![("IAM_ROLE", "arn:aws:iam::999999999999:role/ci-deploy")],
            "--allow-role",
        ),
    ];
    for (name, image, env, why) in cases {
        let got = bed.sdk_client(name, image, &env, &[], 1).unwrap();
        assert_eq!(got["ok"], false, "{name} got credentials: {got}");
        let reasons = refusals(&bed, name);
        assert!(
            reasons.iter().any(|r| r.contains(why)),
            "{name}: {reasons:?}"
        );
    }
    // The allowed role still works on the same daemon.
    let ok = bed
        .sdk_client(
            "allowed",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &[],
            1,
        )
        .unwrap();
    assert_eq!(ok["ok"], true, "{ok}");
    assert!(bed.daemon.log().contains("role refused"));
    assert_real_imds_untouched(&bed);
}

#[test]
fn concurrent_containers_only_ever_receive_their_own_role() {
    let bed = E2eBed::start(&[]).expect("bed");
    let reports: Vec<(String, Value)> = std::thread::scope(|s| {
        let runs: Vec<_> = [("deployer", ROLE_DEPLOY), ("builder", ROLE_BUILD)]
            .into_iter()
            .map(|(name, role)| {
                let bed = &bed;
                s.spawn(move || {
                    (
                        role.to_string(),
                        bed.sdk_client(name, bed.base_image(), &[("IAM_ROLE", role)], &[], 15)
                            .unwrap(),
                    )
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (role, report) in reports {
        assert_eq!(report["ok"], true, "{report}");
        let arns = report["arns"].as_array().unwrap();
        assert_eq!(arns.len(), 15);
        for arn in arns {
            assert!(
                arn.as_str()
                    .unwrap()
                    .contains(&format!(":assumed-role/{role}/")),
                "{role} received {arn}"
            );
        }
    }
    assert_real_imds_untouched(&bed);
}

#[test]
fn a_host_network_container_gets_its_role_too() {
    let bed = E2eBed::start(&[]).expect("bed");
    // It has no address of its own: its connections come from the host's.
    let got = bed
        .sdk_client(
            "hostnet",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_BUILD)],
            &["--network", "host"],
            1,
        )
        .unwrap();
    assert_eq!(got["ok"], true, "{got}");
    assert!(
        got["arns"][0]
            .as_str()
            .unwrap()
            .contains(&format!(":assumed-role/{ROLE_BUILD}/")),
        "{got}"
    );
    assert_real_imds_untouched(&bed);
}
