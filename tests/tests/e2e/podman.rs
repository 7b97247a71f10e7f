//! Rootful Podman beside Docker on one host, as gitlab-runner's Docker
//! executor uses it (`host = "unix:///run/podman/podman.sock"`): a private
//! `podman system service` in the bed's namespace, containers on its
//! netavark bridge in the attached subtree, the daemon following both
//! runtimes.

use metaproxy_tests::{
    bed::{bin, job_label, E2eBed, ROLE_DEPLOY},
    fake_imds::REGION,
    moto::PORT,
    podman::{Podman, BASE_IMAGE, GATEWAY},
    unique_name,
};
use serde_json::Value;

use super::{assert_real_imds_untouched, is_assumed, CREDS};

/// The bed, with the daemon told of a Podman it starts afterwards, and
/// that Podman, its containers under the probe's subtree.
fn bed_with_podman() -> (E2eBed, Podman) {
    let dir = std::env::temp_dir().join(unique_name("mpt-podman"));
    let host = format!("unix://{}", Podman::socket_in(&dir).display());
    let bed = E2eBed::start(&["--podman-host", &host]).unwrap();
    let attached = bed.cg.child("attached").unwrap();
    let podman = Podman::start(
        &bed.ns,
        &bed.cg.child("services/podman").unwrap(),
        &format!("{}/podman", bed.cg.relative(&attached)),
        dir,
    )
    .unwrap();
    (bed, podman)
}

/// Runs the AWS SDK client in a Podman container labelled as job `job`,
/// with `env` and more `podman run` options `extra`, and returns its
/// report.
fn sdk_client(
    podman: &Podman,
    name: &str,
    job: u32,
    env: &[(&str, &str)],
    extra: &[&str],
) -> Value {
    let mut args = vec![
        "--name".to_string(),
        name.to_string(),
        "--label".to_string(),
        job_label(job),
        "-e".to_string(),
        format!("AWS_REGION={REGION}"),
        "-e".to_string(),
        format!("AWS_ENDPOINT_URL_STS=http://{GATEWAY}:{PORT}"),
    ];
    for (k, v) in env {
        args.extend(["-e".to_string(), format!("{k}={v}")]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(Podman::host_binary_mounts(&[&bin("mp-sdk-client")]));
    args.extend([
        BASE_IMAGE.to_string(),
        "/mp-sdk-client".to_string(),
        "1".to_string(),
    ]);
    let out = podman.run(&args).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| {
        panic!(
            "container {name}: {e}: {stdout}\n{}\n--- podman log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            podman.log()
        )
    })
}

#[test]
fn podmans_job_containers_get_their_role_beside_dockers_and_others_get_nothing() {
    let (bed, podman) = bed_with_podman();
    let with = sdk_client(
        &podman,
        "podman-with-role",
        5151,
        &[("IAM_ROLE", ROLE_DEPLOY)],
        &[],
    );
    assert_real_imds_untouched(&bed);
    assert_eq!(with["ok"], true, "{with}\n{}", bed.daemon.log());
    assert!(
        is_assumed(
            ROLE_DEPLOY,
            "gitlab-job-5151",
            with["arns"][0].as_str().unwrap()
        ),
        "{with}"
    );
    // The connection log names Podman's container.
    let conns = bed.daemon.connections().unwrap();
    assert!(
        conns.iter().any(|c| c["container"] == "podman-with-role"
            && c["request"] == format!("GET {CREDS}{ROLE_DEPLOY}")
            && c["outcome"] == "served"),
        "{conns:#?}"
    );

    let without = sdk_client(&podman, "podman-no-role", 5152, &[], &[]);
    assert_eq!(without["ok"], false, "{without}");
    assert!(without["arns"].as_array().unwrap().is_empty(), "{without}");

    // Podman's user-space network: slirp4netns relays the container's
    // connections from the host's own address (as it does for every
    // rootless container). The kernel shows the relay serves the
    // container's namespace, so the container gets its role.
    let relayed = sdk_client(
        &podman,
        "podman-slirp4netns",
        5154,
        &[
            ("IAM_ROLE", ROLE_DEPLOY),
            // Podman's bridge goes with its last container; Docker's stays.
            (
                "AWS_ENDPOINT_URL_STS",
                &format!("http://{}:{PORT}", metaproxy_tests::docker::GATEWAY),
            ),
        ],
        &["--network", "slirp4netns"],
    );
    assert_eq!(relayed["ok"], true, "{relayed}\n{}", bed.daemon.log());
    assert!(
        is_assumed(
            ROLE_DEPLOY,
            "gitlab-job-5154",
            relayed["arns"][0].as_str().unwrap()
        ),
        "{relayed}"
    );
    let conns = bed.daemon.connections().unwrap();
    assert!(
        conns.iter().any(|c| c["container"] == "podman-slirp4netns"
            && c["via"]
                .as_str()
                .is_some_and(|v| v.starts_with("relayed by pid"))
            && c["outcome"] == "served"),
        "{conns:#?}"
    );

    // Docker's containers are served as before, side by side.
    let docker = bed
        .sdk_client(
            "docker-with-role",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &["--label", &job_label(5153)],
            1,
        )
        .unwrap();
    assert!(
        is_assumed(
            ROLE_DEPLOY,
            "gitlab-job-5153",
            docker["arns"][0].as_str().unwrap()
        ),
        "{docker}"
    );
    assert_real_imds_untouched(&bed);
}
