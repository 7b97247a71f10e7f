//! STS and the credential cache: one AssumeRole per job and role, the
//! prefetch, STS down, containers removed, what reaches STS.

use std::time::Duration;

use metaproxy_tests::{
    bed::{job_label, role_arn, E2eBed, ROLE_BUILD, ROLE_DEPLOY},
    wait_for,
};
use serde_json::Value;

use crate::{assert_real_imds_untouched, is_assumed, refusals, CREDS, IMDS};

#[test]
fn two_hundred_concurrent_first_requests_make_one_assume_role() {
    let bed = E2eBed::start(&[]).expect("bed");
    let label = job_label(777);
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
    let misses = || {
        bed.daemon
            .metric(r#"metaproxy_credential_cache_lookups_total{result="miss"}"#)
    };
    let misses_before = misses();
    bed.moto.pause(true);
    let out = std::thread::scope(|s| {
        let burst = s.spawn(|| bed.dockerd.run(&args));
        let open = wait_for("200 open connections", Duration::from_secs(30), || {
            let open = bed.daemon.status().ok()?["connections"]["open"].as_u64()?;
            (open >= 200).then_some(())
        });
        // Until every request has reached the daemon and met the empty
        // cache (the prefetch counts no lookup), well within their wait
        // budget.
        let arrived = open.and_then(|()| {
            wait_for("200 requests at the cache", Duration::from_secs(10), || {
                (misses() >= misses_before + 200.0).then_some(())
            })
        });
        bed.moto.pause(false);
        arrived.unwrap_or_else(|e| panic!("{e}: {} misses", misses() - misses_before));
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
    let label = job_label(888);
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
    let label = job_label(999);
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
    let label = job_label(555);
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
fn session_tags_and_source_identity_from_the_job_reach_sts() {
    let bed = E2eBed::start(&[
        "--session-tags",
        "--transitive-session-tags",
        "--source-identity",
    ])
    .expect("bed");
    let labels = [
        "--label",
        &job_label(4711),
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
