//! Controls for the check most tests end with, `assert_real_imds_untouched`:
//! a container that does reach the fake real IMDS fails it, and is named.
//! Each container runs in a cgroup outside the subtree the probe is
//! attached to, so its connect is not redirected; it stays in the bed's
//! namespaces all the same.

use metaproxy_tests::{bed::E2eBed, daemon::detach_link};

/// `docker run` options that put a container outside the probe's subtree.
fn outside_the_probe(bed: &E2eBed) -> [String; 2] {
    let outside = bed.cg.child("outside").unwrap();
    ["--cgroup-parent".into(), bed.cg.relative(&outside)]
}

/// A `--network host` job shares the host's address with the daemon:
/// only its socket's cgroup tells its call from the daemon's.
#[test]
fn the_real_imds_check_names_a_host_network_container_that_reached_it() {
    let bed = E2eBed::start(&[]).expect("bed");
    let [flag, parent] = outside_the_probe(&bed);
    let c = bed
        .container(
            "control-host",
            bed.base_image(),
            &[],
            &["--network", "host", &flag, &parent],
        )
        .unwrap();
    let got = c.imds("GET", "/latest/meta-data/instance-id", &[]);
    assert_eq!(
        (got["status"].as_u64(), got["body"].as_str()),
        (Some(200), Some("i-0123456789abcdef0")),
        "the fake real IMDS answers it: {got}"
    );
    let id = bed
        .dockerd
        .docker(&["inspect", "-f", "{{.Id}}", &c.name])
        .unwrap();
    let err = bed
        .check_real_imds_untouched()
        .expect_err("a container's call to the real IMDS passed the check");
    assert!(err.contains(&format!("{parent}/{id}")), "{err}");
}

/// A job on the bridge: its packets are forwarded to IMDS, which the
/// packet guard drops, so the guard is taken off (and the watchdog, which
/// would put it back, is off).
#[test]
fn the_real_imds_check_names_a_bridged_container_that_reached_it() {
    let bed = E2eBed::start_with_env(&[], &[("METAPROXY_WATCHDOG", "off")]).expect("bed");
    let guards: Vec<_> = std::fs::read_dir(bed.daemon.pin_dir().join("links"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("mp_guard_tc_"))
        })
        .collect();
    assert!(!guards.is_empty(), "no guard pins to take off");
    for guard in &guards {
        detach_link(guard);
    }
    let [flag, parent] = outside_the_probe(&bed);
    let c = bed
        .container("control-bridged", bed.base_image(), &[], &[&flag, &parent])
        .unwrap();
    let got = c.imds("GET", "/latest/meta-data/instance-id", &[]);
    assert_eq!(
        (got["status"].as_u64(), got["body"].as_str()),
        (Some(200), Some("i-0123456789abcdef0")),
        "the fake real IMDS answers it: {got}"
    );
    let ip = bed
        .dockerd
        .docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &c.name,
        ])
        .unwrap();
    let err = bed
        .check_real_imds_untouched()
        .expect_err("a container's call to the real IMDS passed the check");
    assert!(err.contains(&format!("{ip}:")), "{err}");
}
