//! `metaproxy doctor` against the bed: its dockerd with containers planted
//! to be found, a runner config written for it, the running daemon and
//! moto, where one role trusts the instance role and one does not. Doctor
//! must find exactly the failures planted.

use std::collections::BTreeSet;

use metaproxy_tests::bed::{E2eBed, ROLE_DEPLOY, ROLE_UNTRUSTING};
use serde_json::Value;

const RUNNERS: &str = r#"
concurrent = 4

[[runners]]
  name = "deploy"
  url = "https://gitlab.example.com"
  token = "glrt-doctor-deploy"
  executor = "docker"
  environment = ["IAM_ROLE=ci-deploy"]
  [runners.docker]
    image = "alpine"
    cap_drop = ["NET_RAW"]

[[runners]]
  name = "untrusted"
  url = "https://gitlab.example.com"
  token = "glrt-doctor-untrusted"
  executor = "docker"
  environment = ["IAM_ROLE=ci-untrusting"]
  [runners.docker]
    image = "alpine"
    cap_drop = ["NET_RAW"]

[[runners]]
  name = "not-allowed"
  url = "https://gitlab.example.com"
  token = "glrt-doctor-admin"
  executor = "docker"
  environment = ["IAM_ROLE=arn:aws:iam::123456789012:role/admin"]
  [runners.docker]
    image = "alpine"
    cap_drop = ["NET_RAW"]
"#;

#[test]
fn doctor_finds_exactly_the_failures_planted_in_docker_the_runner_config_and_the_trust_policies() {
    let bed = E2eBed::start(&[]).expect("bed");
    let dir = bed.scratch().join("doctor");
    std::fs::create_dir_all(&dir).unwrap();
    let runners = dir.join("config.toml");
    std::fs::write(&runners, RUNNERS).unwrap();
    let defaults = dir.join("metaproxy.default");
    std::fs::write(
        &defaults,
        "# as /etc/default/metaproxy\nMETAPROXY_ALLOW_ROLE=arn:aws:iam::123456789012:role/ci-*\n",
    )
    .unwrap();
    // Containers that undo the promise: with NET_ADMIN (privileged ones
    // cannot start on this machine; the unit tests read one), with a
    // Docker socket, with an IAM_ROLE only its image set.
    let socket = dir.join("docker.sock");
    std::fs::write(&socket, "").unwrap();
    let _net_admin = bed
        .container(
            "doc-net-admin",
            bed.base_image(),
            &[],
            &["--cap-add", "NET_ADMIN"],
        )
        .unwrap();
    let mount = format!("{}:/var/run/docker.sock", socket.display());
    let _socket = bed
        .container("doc-socket", bed.base_image(), &[], &["-v", &mount])
        .unwrap();
    let ctx = dir.join("image");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {}\nENV IAM_ROLE={ROLE_DEPLOY}\n", bed.base_image()),
    )
    .unwrap();
    let built = std::process::Command::new("/usr/bin/docker")
        .arg("-H")
        .arg(bed.dockerd.host())
        .args(["build", "-q", "-t", "mp-image-role"])
        .env("DOCKER_BUILDKIT", "0")
        .arg(&ctx)
        .output()
        .unwrap();
    assert!(built.status.success(), "{built:?}");
    let _image_role = bed
        .container("doc-image-role", "mp-image-role", &[], &[])
        .unwrap();

    let out = std::process::Command::new(metaproxy_tests::daemon::metaproxy_bin())
        .args(["doctor", "--json"])
        .args(bed.daemon.doctor_args(&runners, &defaults))
        .env("DOCKER_HOST", bed.dockerd.host())
        .output()
        .unwrap();
    let checks: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(!out.status.success(), "failures give a non-zero exit");
    let failed: BTreeSet<(String, String)> = checks
        .iter()
        .filter(|c| c["level"] == "fail")
        .map(|c| {
            (
                c["area"].as_str().unwrap().to_string(),
                c["check"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let planted: BTreeSet<(String, String)> = [
        ("container doc-net-admin", "cap_add"),
        ("container doc-socket", "docker socket"),
        ("container doc-image-role", "IAM_ROLE"),
        ("runner untrusted", "trust policy"),
        ("runner not-allowed", "role"),
    ]
    .into_iter()
    .map(|(a, c)| (a.to_string(), c.to_string()))
    .collect();
    assert_eq!(failed, planted, "{checks:#?}");
    let find = |area: &str, check: &str| -> &Value {
        checks
            .iter()
            .find(|c| c["area"] == area && c["check"] == check)
            .unwrap_or_else(|| panic!("no {area} {check}: {checks:#?}"))
    };
    // Every failure says how to fix it; the trust policy's names the
    // statement, for the instance role the daemon runs as.
    assert!(checks
        .iter()
        .filter(|c| c["level"] == "fail")
        .all(|c| c["fix"].is_string()));
    let trust = find("runner untrusted", "trust policy");
    let fix = trust["fix"].as_str().unwrap();
    assert!(
        fix.contains(&format!("add to {ROLE_UNTRUSTING}'s trust policy"))
            && fix.contains("arn:aws:iam::123456789012:role/metaproxy-instance-role")
            && fix.contains("sts:AssumeRole"),
        "{trust}"
    );
    assert_eq!(find("runner deploy", "trust policy")["level"], "ok");
    assert_eq!(find("aws", "identity")["level"], "ok");
    // The bed's instance takes IMDSv1: a warning, not a failure.
    assert_eq!(find("aws", "IMDS mode")["level"], "warn");
    assert_eq!(find("metaproxy", "flags")["level"], "ok");
    assert_eq!(find("host", "packet guard")["level"], "ok");
    // The dry AssumeRole was the shortest, as metaproxy-doctor.
    let dry: Vec<_> = bed
        .moto
        .assume_role_requests()
        .into_iter()
        .filter(|form| {
            form.iter()
                .any(|(k, v)| k == "RoleSessionName" && v == "metaproxy-doctor")
        })
        .collect();
    assert!(!dry.is_empty(), "no dry AssumeRole at moto");
    assert!(dry.iter().all(|form| form
        .iter()
        .any(|(k, v)| k == "DurationSeconds" && v == "900")));
    // The text form: one line per check, the same verdicts.
    let text = std::process::Command::new(metaproxy_tests::daemon::metaproxy_bin())
        .args(["doctor", "--offline"])
        .args(bed.daemon.doctor_args(&runners, &defaults))
        .env("DOCKER_HOST", bed.dockerd.host())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL  container doc-net-admin: cap_add: ")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("skip  aws: trust policies: --offline")),
        "{text}"
    );
}
