//! The systemd unit and the drop-ins that order Docker, containerd and
//! gitlab-runner after metaproxy, checked by `systemd-analyze verify` with
//! the binary under test in place of /usr/bin/metaproxy. Any warning fails.

use std::{fs, path::Path, process::Command};

use metaproxy_tests::daemon::metaproxy_bin;

fn packaging() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging"))
}

fn install(from: &Path, to: &Path) {
    let text = fs::read_to_string(from).unwrap();
    let bin = metaproxy_bin();
    fs::write(
        to,
        text.replace("/usr/bin/metaproxy", bin.to_str().unwrap()),
    )
    .unwrap();
}

fn verify(dir: &Path, unit: &str) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join(unit))
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()))
        .current_dir(dir)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "{unit}: {said}"
    );
}

#[test]
fn the_unit_and_the_drop_ins_verify_cleanly() {
    let dir = std::env::temp_dir().join(metaproxy_tests::unique_name("mpt"));
    fs::create_dir_all(&dir).unwrap();
    install(
        &packaging().join("metaproxy.service"),
        &dir.join("metaproxy.service"),
    );
    verify(&dir, "metaproxy.service");
    for dependent in [
        "docker.service",
        "containerd.service",
        "gitlab-runner.service",
    ] {
        fs::write(dir.join(dependent), "[Service]\nExecStart=/bin/true\n").unwrap();
        let dropins = dir.join(format!("{dependent}.d"));
        fs::create_dir_all(&dropins).unwrap();
        install(
            &packaging().join("dropins/metaproxy-dropin.conf"),
            &dropins.join("metaproxy.conf"),
        );
        verify(&dir, dependent);
    }
    let unit = fs::read_to_string(packaging().join("metaproxy.service")).unwrap();
    let dropin = fs::read_to_string(packaging().join("dropins/metaproxy-dropin.conf")).unwrap();
    // Restarting metaproxy must never stop Docker or running jobs.
    for text in [&unit, &dropin] {
        assert!(!text.lines().any(|l| l.starts_with("Requires=")
            || l.starts_with("BindsTo=")
            || l.starts_with("PartOf=")));
    }
    assert!(unit.contains("Type=notify"));
    assert!(unit.contains("Before=docker.service containerd.service gitlab-runner.service"));
    assert!(dropin.contains("ExecStartPre=/usr/bin/metaproxy status --redirect"));
    fs::remove_dir_all(&dir).unwrap();
}
