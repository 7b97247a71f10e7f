//! Rootless runtimes' user-space relays: a container whose network
//! namespace's only way out is slirp4netns (as rootless Podman gives its
//! containers) reaches the daemon from a host address, through the
//! relay's own host socket. It gets its container's role because the
//! kernel shows the relay serves its namespace, and nothing else on the
//! host can claim its record that way.

use std::process::Command;
use std::time::Duration;

use metaproxy_tests::{
    bed::{job_label, Container, E2eBed, ROLE_DEPLOY},
    process::{spawn_in, ChildGuard},
};
use serde_json::Value;

use super::{assert_real_imds_untouched, is_assumed, CREDS};

/// A container with no network of its own, and slirp4netns relaying its
/// namespace as rootless Podman would set it up: a TAP device in the
/// namespace, the relay in the host's namespace, in the attached subtree
/// as it would be under a probe at the cgroup root.
fn relayed_container(
    bed: &E2eBed,
    name: &str,
    env: &[(&str, &str)],
    job: u32,
) -> (Container, ChildGuard) {
    let container = bed
        .container(
            name,
            bed.base_image(),
            env,
            &["--network", "none", "--label", &job_label(job)],
        )
        .unwrap();
    let pid = bed
        .dockerd
        .docker(&["inspect", "-f", "{{.State.Pid}}", name])
        .unwrap();
    let mut cmd = Command::new("slirp4netns");
    cmd.args(["--configure", "--mtu=65520", "--disable-host-loopback"])
        .args([pid.trim(), "tap0"]);
    let relay = spawn_in(
        cmd,
        &bed.ns.path(),
        &bed.cg.child(&format!("attached/relay-{name}")).unwrap(),
    )
    .unwrap();
    metaproxy_tests::wait_for("slirp4netns's tap0", Duration::from_secs(10), || {
        let out = Command::new("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", pid.trim()))
            .args(["ip", "-4", "-o", "addr", "show", "tap0"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .contains("10.0.2.100")
            .then_some(())
    })
    .unwrap();
    (container, relay)
}

fn sdk(container: &Container) -> Value {
    container.exec(&["/mp-sdk-client", "1"]).unwrap()
}

#[test]
fn a_container_behind_slirp4netns_gets_its_role_and_one_without_gets_nothing() {
    let bed = E2eBed::start(&[]).unwrap();
    let (with, relay) = relayed_container(&bed, "relayed", &[("IAM_ROLE", ROLE_DEPLOY)], 5171);
    let report = sdk(&with);
    assert_real_imds_untouched(&bed);
    assert_eq!(report["ok"], true, "{report}\n{}", bed.daemon.log());
    assert!(
        is_assumed(
            ROLE_DEPLOY,
            "gitlab-job-5171",
            report["arns"][0].as_str().unwrap()
        ),
        "{report}"
    );
    // The audit line names the container, and the relay that carried it.
    let conns = bed.daemon.connections().unwrap();
    let via = format!("relayed by pid {}", relay.pid());
    assert!(
        conns.iter().any(|c| c["container"] == "relayed"
            && c["via"] == via.as_str()
            && c["request"] == format!("GET {CREDS}{ROLE_DEPLOY}")
            && c["outcome"] == "served"),
        "{conns:#?}"
    );

    let (without, _relay) = relayed_container(&bed, "relayed-no-role", &[], 5172);
    let report = sdk(&without);
    assert_eq!(report["ok"], false, "{report}");
    assert!(report["arns"].as_array().unwrap().is_empty(), "{report}");
    assert_real_imds_untouched(&bed);
}
