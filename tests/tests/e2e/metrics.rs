//! Metrics and readiness: exact counts, no credentials on the listener.

use std::time::Duration;

use metaproxy_tests::{
    bed::{E2eBed, ROLE_DEPLOY},
    daemon::sample_value,
    docker::GATEWAY,
    wait_for,
};
use serde_json::Value;

use crate::{assert_real_imds_untouched, CREDS};

#[test]
fn metrics_count_a_known_sequence_exactly_and_the_listener_serves_no_credentials() {
    let bed = E2eBed::start(&[]).expect("bed");
    wait_for("ready", Duration::from_secs(20), || {
        // Ready; a gap the host cannot close (no BPF LSM programs) is said
        // after it, on the same line.
        let (code, body) = bed.daemon.metrics_get("/readyz").ok()?;
        (code == 200 && body.starts_with("ready")).then_some(())
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
