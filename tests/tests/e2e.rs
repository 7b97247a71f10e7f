//! End to end on the real parts: the kernel probe, a private dockerd, moto
//! as STS with auth on, the AWS SDK for Rust inside containers. Only EC2's
//! metadata service is faked, and it records every caller: no container may
//! ever reach it. Needs root; run through `cargo xtask test`.

use std::time::Duration;

use metaproxy_tests::{
    bed::{role_arn, E2eBed, ROLE_BUILD, ROLE_DEPLOY},
    daemon::sample_value,
    docker::GATEWAY,
    fake_imds::USER_DATA_MARKER,
    wait_for,
};
use serde_json::Value;

const IMDS: &str = "169.254.169.254:80";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
const JOB_LABEL: &str = "com.gitlab.gitlab-runner.job.id";

fn is_assumed(role: &str, session: &str, arn: &str) -> bool {
    arn == format!("arn:aws:sts::123456789012:assumed-role/{role}/{session}")
}

/// No container of the bed ever reached the real IMDS.
fn assert_real_imds_untouched(bed: &E2eBed) {
    // Every caller here is a container: nothing may be passed through.
    let passed: Vec<_> = bed
        .daemon
        .connections()
        .unwrap()
        .into_iter()
        .filter(|c| c["outcome"] == "passthrough")
        .collect();
    assert!(
        passed.is_empty(),
        "container requests passed through: {passed:?}"
    );
    let calls = bed.container_calls_to_real_imds();
    assert!(
        calls.is_empty(),
        "containers reached the real IMDS: {calls:?}"
    );
}

fn refusals_and_unauthorized(bed: &E2eBed, container: &str) -> Vec<String> {
    bed.daemon
        .connections()
        .unwrap()
        .into_iter()
        .filter(|c| c["container"] == container && c["outcome"] != "served")
        .map(|c| c["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn refusals(bed: &E2eBed, container: &str) -> Vec<String> {
    bed.daemon
        .connections()
        .unwrap()
        .into_iter()
        .filter(|c| c["container"] == container && c["outcome"] == "refused")
        .map(|c| c["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn a_container_with_an_allowed_role_gets_exactly_that_role_and_one_without_gets_nothing() {
    let bed = E2eBed::start(&[]).expect("bed");
    let label = format!("{JOB_LABEL}=4242");
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
fn the_imds_surface_behaves_like_aws_and_leaks_nothing() {
    let bed = E2eBed::start(&[]).expect("bed");
    let c = bed
        .container(
            "surface",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &[],
        )
        .unwrap();

    // Tokens: TTL required and bounded, echoed back; proxies refused.
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
    let token = format!(
        "X-aws-ec2-metadata-token: {}",
        put["body"].as_str().unwrap()
    );
    assert_eq!(
        c.imds("GET", CREDS, &["X-aws-ec2-metadata-token: forged"])["status"],
        401
    );

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

    // Malformed HTTP gets a clear 400.
    assert_eq!(c.imds("GET", "/a b", &[])["status"], 400);
    // IMDSv1 is served by default.
    assert_eq!(c.imds("GET", CREDS, &[])["body"], ROLE_DEPLOY);

    // Non-secret metadata comes from the real IMDS; everything else is 404.
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

#[test]
fn two_hundred_concurrent_first_requests_make_one_assume_role() {
    let bed = E2eBed::start(&[]).expect("bed");
    let label = format!("{JOB_LABEL}=777");
    let mut args = bed.container_args("burst", &[("IAM_ROLE", ROLE_BUILD)]);
    args.extend(["--label".into(), label, bed.base_image().into()]);
    args.extend(
        [
            "/mp-client",
            "burst",
            IMDS,
            &format!("{CREDS}{ROLE_BUILD}"),
            "200",
        ]
        .map(String::from),
    );
    // STS is held until all 200 connections are open, so the container's
    // start-time prefetch cannot finish first: every request meets the one
    // AssumeRole in flight. (Moto's guard resumes it if anything panics.)
    bed.moto.pause(true);
    let out = std::thread::scope(|s| {
        let burst = s.spawn(|| bed.dockerd.run(&args));
        let open = wait_for("200 open connections", Duration::from_secs(30), || {
            let open = bed.daemon.status().ok()?["connections"]["open"].as_u64()?;
            (open >= 200).then_some(())
        });
        // Let the requests reach the daemon, well within their wait budget.
        std::thread::sleep(Duration::from_millis(150));
        bed.moto.pause(false);
        open.unwrap();
        burst.join().unwrap().unwrap()
    });
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{out:?}"));
    let statuses = report["statuses"].as_array().unwrap();
    assert_eq!(statuses.len(), 200);
    assert!(statuses.iter().all(|s| s == 200), "{report}");
    assert_eq!(
        report["access_key_ids"].as_array().unwrap().len(),
        1,
        "{report}"
    );
    let calls: Vec<_> = bed
        .moto
        .assume_role_calls()
        .into_iter()
        .filter(|(_, session)| session == "gitlab-job-777")
        .collect();
    assert_eq!(calls.len(), 1, "AssumeRole calls at moto: {calls:?}");
}

#[test]
fn a_container_started_with_a_role_is_served_from_the_prefetched_cache_even_with_sts_down() {
    let bed = E2eBed::start(&[]).expect("bed");
    let label = format!("{JOB_LABEL}=888");
    let c = bed
        .container(
            "prefetched",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &["--label", &label],
        )
        .unwrap();
    let session_calls = || {
        bed.moto
            .assume_role_calls()
            .into_iter()
            .filter(|(_, s)| s == "gitlab-job-888")
            .count()
    };
    // The container has asked for nothing, yet its credentials exist.
    wait_for("the prefetch", Duration::from_secs(20), || {
        (session_calls() == 1).then_some(())
    })
    .unwrap();
    assert!(bed
        .daemon
        .connections()
        .unwrap()
        .iter()
        .all(|conn| conn["container"] != "prefetched"));

    bed.moto.pause(true);
    let started = std::time::Instant::now();
    let creds = c.imds("GET", &format!("{CREDS}{ROLE_DEPLOY}"), &[]);
    let waited = started.elapsed();
    bed.moto.pause(false);
    assert_eq!(creds["status"], 200, "{creds}");
    assert!(
        waited < Duration::from_secs(2),
        "the request waited {waited:?} with STS down"
    );
    assert_eq!(session_calls(), 1);
}

#[test]
fn with_sts_down_a_request_fails_fast_and_the_retry_after_recovery_succeeds() {
    let bed = E2eBed::start(&[]).expect("bed");
    bed.moto.pause(true);
    let label = format!("{JOB_LABEL}=999");
    // (Moto's guard resumes it if anything below panics.)
    let c = bed
        .container(
            "sts-down",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &["--label", &label],
        )
        .unwrap();
    let started = std::time::Instant::now();
    let down = c.imds("GET", &format!("{CREDS}{ROLE_DEPLOY}"), &[]);
    let waited = started.elapsed();
    bed.moto.pause(false);
    assert_eq!(down["status"], 503, "{down}");
    assert!(
        waited < Duration::from_secs(2),
        "a request waited {waited:?} on a dead STS"
    );
    assert!(
        refusals(&bed, "sts-down").iter().any(|r| r.contains("STS")),
        "{:?}",
        refusals(&bed, "sts-down")
    );
    let ok = wait_for(
        "credentials after STS recovers",
        Duration::from_secs(30),
        || {
            let got = c.imds("GET", &format!("{CREDS}{ROLE_DEPLOY}"), &[]);
            (got["status"] == 200).then_some(got)
        },
    )
    .unwrap();
    assert!(ok["body"].as_str().unwrap().contains("AccessKeyId"));
}

#[test]
fn a_removed_containers_credentials_are_dropped() {
    let bed = E2eBed::start(&[]).expect("bed");
    let label = format!("{JOB_LABEL}=555");
    let calls = || {
        bed.moto
            .assume_role_calls()
            .into_iter()
            .filter(|(_, s)| s == "gitlab-job-555")
            .count()
    };
    let first = bed
        .container(
            "first",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &["--label", &label],
        )
        .unwrap();
    wait_for("the first prefetch", Duration::from_secs(20), || {
        (calls() == 1).then_some(())
    })
    .unwrap();
    drop(first);
    // Same job, same role: were the old credentials still cached, the new
    // container would be served them; they went with their container.
    let second = bed
        .container(
            "second",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &["--label", &label],
        )
        .unwrap();
    wait_for("a fresh AssumeRole", Duration::from_secs(20), || {
        (calls() == 2).then_some(())
    })
    .unwrap();
    assert_eq!(
        second.imds("GET", &format!("{CREDS}{ROLE_DEPLOY}"), &[])["status"],
        200
    );
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

#[test]
fn trace_logging_never_shows_a_token_or_a_secret() {
    // The admin turns everything up; the AWS SDK's trace output would carry
    // the daemon's own IMDS token.
    let bed = E2eBed::start_with_env(&[], &[("METAPROXY_LOG", "trace")]).expect("bed");
    let c = bed
        .container(
            "traced",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &[],
        )
        .unwrap();
    let token = c.token_header(60);
    let creds = c.imds("GET", &format!("{CREDS}{ROLE_DEPLOY}"), &[&token]);
    assert_eq!(creds["status"], 200, "{creds}");
    let doc: Value = serde_json::from_str(creds["body"].as_str().unwrap()).unwrap();
    let log = bed.daemon.log();
    assert!(log.contains("accepted connection"), "debug logging is on");
    let issued = bed.imds.issued_tokens();
    assert!(
        !issued.is_empty(),
        "the daemon fetched its own credentials with a token"
    );
    for secret in issued.iter().map(String::as_str).chain([
        doc["SecretAccessKey"].as_str().unwrap(),
        doc["Token"].as_str().unwrap(),
        token.split_once(": ").unwrap().1,
    ]) {
        assert!(!log.contains(secret), "the log shows a secret: {secret}");
    }
    assert_real_imds_untouched(&bed);
}

/// Builds `dockerfile` with the bed's dockerd through the 20.10 CLI, with
/// BuildKit or the classic builder; returns the build's output.
fn docker_build(bed: &E2eBed, buildkit: bool, dockerfile: &str) -> String {
    let ctx = bed.scratch().join(if buildkit {
        "ctx-buildkit"
    } else {
        "ctx-classic"
    });
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    let mut cmd = std::process::Command::new("/usr/bin/docker");
    cmd.arg("-H")
        .arg(bed.dockerd.host())
        .args(["build", "--no-cache", "-t", "mp-built"])
        .env("DOCKER_BUILDKIT", if buildkit { "1" } else { "0" });
    if buildkit {
        cmd.arg("--progress=plain");
    }
    let out = cmd.arg(&ctx).output().expect("docker build");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "docker build failed: {said}");
    said
}

#[test]
fn docker_build_steps_reach_neither_pass_through_nor_the_real_imds() {
    let bed = E2eBed::start(&[]).expect("bed");
    let dockerfile = format!(
        "FROM {}\nRUN /bin/busybox printf 'GET /latest/meta-data/iam/security-credentials/ HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n' | /bin/busybox nc -w 3 169.254.169.254 80 2>&1 ; echo step-done\n",
        bed.base_image()
    );
    let credential_calls = || {
        bed.imds
            .calls()
            .iter()
            .flat_map(|c| c.requests.clone())
            .filter(|(_, path, _)| path.contains("security-credentials"))
            .count()
    };
    let before = credential_calls();
    // BuildKit runs RUN steps in cgroups of its own, in no container.
    let said = docker_build(&bed, true, &dockerfile);
    assert!(said.contains("step-done"), "{said}");
    // The instance's role name is what the real IMDS would have listed.
    assert!(!said.contains("metaproxy-instance-role"), "{said}");
    let conns = bed.daemon.connections().unwrap();
    for c in conns.iter().filter(|c| {
        c["cgroup"]
            .as_str()
            .is_some_and(|p| p.contains("/buildkit/"))
    }) {
        assert_eq!(c["outcome"], "refused", "{c}");
        assert!(
            c["reason"]
                .as_str()
                .unwrap()
                .contains("BuildKit build step"),
            "{c}"
        );
    }
    // The classic builder runs each step as a container: it has no role.
    let said = docker_build(&bed, false, &dockerfile);
    assert!(said.contains("step-done"), "{said}");
    assert!(!said.contains("metaproxy-instance-role"), "{said}");
    let conns = bed.daemon.connections().unwrap();
    // Whatever the step's connection came to, it was not served a role.
    for c in conns.iter().filter(|c| c["container_id"].is_string()) {
        assert_ne!(c["outcome"], "served", "{c}");
    }
    assert!(
        conns.iter().all(|c| c["outcome"] != "passthrough"),
        "{conns:?}"
    );
    assert_eq!(
        credential_calls(),
        before,
        "a build step reached the real IMDS"
    );
    assert_real_imds_untouched(&bed);
}

fn daemon_rss_kib(bed: &E2eBed) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", bed.daemon.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[test]
fn one_containers_connection_flood_neither_slows_another_nor_bloats_the_daemon() {
    let bed = E2eBed::start(&[]).expect("bed");
    let steady = bed
        .container(
            "steady",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &[],
        )
        .unwrap();
    let path = format!("{CREDS}{ROLE_DEPLOY}");
    assert_eq!(steady.imds("GET", &path, &[])["status"], 200);
    let rss_before = daemon_rss_kib(&bed);

    // 4000 connections from one job: half slowloris, half idle keep-alive.
    let mut args = bed.container_args("flood", &[]);
    args.extend(["--ulimit".into(), "nofile=10000:10000".into()]);
    args.push(bed.base_image().into());
    args.extend(["/mp-client", "flood", IMDS, "4000", "25"].map(String::from));
    let (latency, rss_during, status) = std::thread::scope(|s| {
        let flood = s.spawn(|| bed.dockerd.run(&args));
        std::thread::sleep(Duration::from_secs(6));
        let latency = steady
            .exec(&["/mp-client", "latency", IMDS, &path, "300"])
            .unwrap();
        let rss = daemon_rss_kib(&bed);
        let status = bed.daemon.status().unwrap();
        let out = flood.join().unwrap().unwrap();
        assert!(out.status.success(), "{out:?}");
        (latency, rss, status)
    });
    assert_eq!(latency["ok"], true, "{latency}");
    let p99 = latency["p99_us"].as_f64().unwrap();
    assert!(
        p99 < 50_000.0,
        "the other job's p99 was {p99} us under the flood"
    );
    let grown = rss_during.saturating_sub(rss_before);
    assert!(
        grown < 32 * 1024,
        "the daemon grew by {grown} KiB under the flood ({rss_before} -> {rss_during})"
    );
    let conns = &status["connections"];
    assert!(
        conns["largest_per_container"].as_u64().unwrap() <= 256,
        "{status}"
    );
    assert!(
        conns["shed"].as_u64().unwrap() > 0,
        "the excess was closed: {status}"
    );
    println!(
        "flood: other job p50 {} us p99 {p99} us; daemon RSS {rss_before} -> {rss_during} KiB; {status}",
        latency["p50_us"]
    );
}

#[test]
fn a_classic_build_step_with_an_iam_role_arg_gets_no_role() {
    let bed = E2eBed::start(&[]).expect("bed");
    // The classic builder puts a build ARG into the step container's
    // environment, where the image's ENV check cannot see it.
    let dockerfile = format!(
        "FROM {}\nARG IAM_ROLE={ROLE_DEPLOY}\nRUN /bin/busybox printf 'GET {CREDS}{ROLE_DEPLOY} HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n' | /bin/busybox nc -w 3 169.254.169.254 80 2>&1 ; echo step-done\n",
        bed.base_image()
    );
    let said = docker_build(&bed, false, &dockerfile);
    assert!(said.contains("step-done"), "{said}");
    assert!(
        !said.contains("AccessKeyId"),
        "a build step got credentials: {said}"
    );
    let refused: Vec<_> = bed
        .daemon
        .connections()
        .unwrap()
        .into_iter()
        .filter(|c| c["container_id"].is_string())
        .collect();
    for c in &refused {
        assert_ne!(c["outcome"], "served", "{c}");
    }
    let calls: Vec<_> = bed
        .moto
        .assume_role_calls()
        .into_iter()
        .filter(|(role, _)| role.contains(ROLE_DEPLOY))
        .collect();
    assert!(calls.is_empty(), "AssumeRole for a build step: {calls:?}");
    assert_real_imds_untouched(&bed);
}

#[test]
fn metrics_count_a_known_sequence_exactly_and_the_listener_serves_no_credentials() {
    let bed = E2eBed::start(&[]).expect("bed");
    wait_for("ready", Duration::from_secs(20), || {
        (bed.daemon.metrics_get("/readyz").ok()? == (200, "ready\n".to_string())).then_some(())
    })
    .expect("/readyz says ready once Docker and STS answer");
    let job = bed
        .container(
            "mx-job",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &[],
        )
        .unwrap();
    let bare = bed
        .container("mx-bare", bed.base_image(), &[], &[])
        .unwrap();
    // The start prefetches the role's credentials: one AssumeRole.
    let assume = "metaproxy_sts_calls_total{operation=\"AssumeRole\"}";
    wait_for("the prefetch", Duration::from_secs(20), || {
        (bed.daemon.metric(assume) == 1.0).then_some(())
    })
    .unwrap();

    let auth = job.token_header(60);
    assert_eq!(job.imds("GET", CREDS, &[&auth])["status"], 200);
    let creds_path = format!("{CREDS}{ROLE_DEPLOY}");
    for _ in 0..2 {
        let creds = job.imds("GET", &creds_path, &[&auth]);
        assert_eq!(creds["status"], 200, "{creds}");
    }
    let bare_auth = bare.token_header(60);
    assert_eq!(bare.imds("GET", CREDS, &[&bare_auth])["status"], 404);
    assert_eq!(
        job.imds("GET", "/latest/user-data", &[&auth])["status"],
        404
    );
    // Through the redirect, /metrics is just another path nobody serves.
    assert_eq!(job.imds("GET", "/metrics", &[&auth])["status"], 404);
    // Nor is the metrics port reachable from a container, at the IMDS
    // address or the host's.
    for addr in [
        "169.254.169.254:9169".to_string(),
        format!("{GATEWAY}:9169"),
    ] {
        let got = job
            .exec(&["/mp-client", "raw", &addr, "GET", "/metrics"])
            .unwrap();
        assert_eq!(got["ok"], false, "{addr}: {got}");
    }

    let (status, metrics) = bed.daemon.metrics_get("/metrics").unwrap();
    assert_eq!(status, 200);
    let requests = |route: &str, outcome: &str| {
        sample_value(
            &metrics,
            &format!("metaproxy_requests_total{{route=\"{route}\",outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(requests("token", "served"), 2.0, "{metrics}");
    assert_eq!(requests("role-listing", "served"), 1.0, "{metrics}");
    assert_eq!(requests("credentials", "served"), 2.0, "{metrics}");
    assert_eq!(requests("role-listing", "no-role"), 1.0, "{metrics}");
    assert_eq!(requests("other", "not-found"), 2.0, "{metrics}");
    for (sample, want) in [
        ("metaproxy_refusals_total{reason=\"no-role\"}", 1.0),
        ("metaproxy_refusals_total{reason=\"not-found\"}", 2.0),
        (
            "metaproxy_credential_cache_lookups_total{result=\"hit\"}",
            2.0,
        ),
        (
            "metaproxy_credential_cache_lookups_total{result=\"miss\"}",
            0.0,
        ),
        (assume, 1.0),
        ("metaproxy_sts_calls_in_flight", 0.0),
        ("metaproxy_served_credentials_remaining_seconds_count", 2.0),
        ("metaproxy_credential_cache_entries", 1.0),
        ("metaproxy_docker_reachable", 1.0),
        ("metaproxy_probe_generation", 1.0),
    ] {
        assert_eq!(sample_value(&metrics, sample), want, "{sample}\n{metrics}");
    }
    // Its own identity worked once, and nothing failed.
    assert_eq!(
        sample_value(
            &metrics,
            "metaproxy_sts_calls_total{operation=\"GetCallerIdentity\"}"
        ),
        1.0
    );
    assert!(
        !metrics.contains("metaproxy_sts_errors_total{"),
        "{metrics}"
    );
    // No secret, no container id, no role name in any label or value.
    let creds = job.imds("GET", &creds_path, &[&auth]);
    let doc: Value = serde_json::from_str(creds["body"].as_str().unwrap()).unwrap();
    for secret in ["AccessKeyId", "SecretAccessKey", "Token"] {
        assert!(!metrics.contains(doc[secret].as_str().unwrap()), "{secret}");
    }
    assert!(!metrics.contains(ROLE_DEPLOY) && !metrics.contains("mx-job"));
    // The startup summary named the daemon's own AWS identity (no secret).
    let log = bed.daemon.log();
    let summary = log
        .lines()
        .find(|l| l.contains(" started "))
        .unwrap_or_else(|| panic!("no summary in\n{log}"));
    assert!(
        summary.contains("aws_identity=account 123456789012 as arn:aws:"),
        "{summary}"
    );
    assert!(summary.contains("docker=reachable"), "{summary}");
    assert_real_imds_untouched(&bed);
}

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
    let got = not_asked
        .exec(&[
            "/mp-client",
            "raw",
            "169.254.170.2:80",
            "GET",
            "/v1/credentials",
        ])
        .unwrap();
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
    let got = c
        .exec(&[
            "/mp-client",
            "raw",
            "169.254.170.2:80",
            "GET",
            "/v1/credentials",
        ])
        .unwrap();
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

#[test]
fn session_tags_and_source_identity_from_the_job_reach_sts() {
    let bed = E2eBed::start(&[
        "--session-tags",
        "--transitive-session-tags",
        "--source-identity",
    ])
    .expect("bed");
    let labels = [
        "--label",
        "com.gitlab.gitlab-runner.job.id=4711",
        "--label",
        "com.gitlab.gitlab-runner.project.id=42",
        "--label",
        "com.gitlab.gitlab-runner.pipeline.id=99",
        "--label",
        "com.gitlab.gitlab-runner.job.ref=release/1.0",
        "--label",
        "com.gitlab.gitlab-runner.runner.id=5",
    ];
    let got = bed
        .sdk_client(
            "tagged",
            bed.base_image(),
            &[
                ("IAM_ROLE", ROLE_DEPLOY),
                ("CI_PROJECT_ID", "42"),
                ("CI_PROJECT_PATH", "group/app"),
                ("CI_COMMIT_REF_PROTECTED", "true"),
            ],
            &labels,
            1,
        )
        .unwrap();
    assert_eq!(got["ok"], true, "{got}");
    assert!(
        is_assumed(
            ROLE_DEPLOY,
            "gitlab-job-4711",
            got["arns"][0].as_str().unwrap()
        ),
        "{got}"
    );
    // What reached STS, from moto's request recorder.
    let form = bed
        .moto
        .assume_role_requests()
        .into_iter()
        .find(|f| f.contains(&("RoleArn".into(), role_arn(ROLE_DEPLOY))))
        .expect("an AssumeRole for the job's role");
    let get = |k: &str| {
        form.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let mut tags = std::collections::HashMap::new();
    for n in 1.. {
        let Some(key) = get(&format!("Tags.member.{n}.Key")) else {
            break;
        };
        tags.insert(key, get(&format!("Tags.member.{n}.Value")).unwrap_or(""));
    }
    for (key, value) in [
        ("gitlab-project-id", "42"),
        ("gitlab-project-path", "group/app"),
        ("gitlab-pipeline-id", "99"),
        ("gitlab-job-id", "4711"),
        ("gitlab-ref", "release/1.0"),
        ("gitlab-ref-protected", "true"),
        ("gitlab-runner-id", "5"),
    ] {
        assert_eq!(tags.get(key).copied(), Some(value), "{key}: {form:?}");
    }
    assert_eq!(get("SourceIdentity"), Some("gitlab-job-4711"), "{form:?}");
    let transitive: Vec<&str> = (1..)
        .map_while(|n| get(&format!("TransitiveTagKeys.member.{n}")))
        .collect();
    assert_eq!(transitive.len(), 7, "{form:?}");
    assert_real_imds_untouched(&bed);
}

/// A scratch directory for a test's own files, removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(metaproxy_tests::unique_name("mpt"));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn policy_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(metaproxy_tests::daemon::metaproxy_bin())
        .arg("policy")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_policy_file_admits_one_project_on_a_protected_ref_and_a_broken_reload_keeps_it() {
    let scratch = Scratch::new();
    let path = scratch.0.join("policy.toml");
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
    let explained = policy_cli(&[
        "explain",
        "proj-b",
        "--admin-socket",
        bed.daemon.admin_socket().to_str().unwrap(),
    ]);
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
