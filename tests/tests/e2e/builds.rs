//! `docker build` steps, BuildKit and classic: no role, no pass-through.

use metaproxy_tests::bed::{E2eBed, ROLE_DEPLOY};

use crate::{assert_real_imds_untouched, CREDS};

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
