//! `cargo xtask test`: unit tests, then the privileged suites in `tests/`
//! (real kernel, real namespaces and cgroups), which need root.

use std::process::Command;

use crate::{run_cmd, workspace_root};

pub fn run(filter: Option<&str>) -> anyhow::Result<()> {
    crate::setup::run()?;
    anyhow::ensure!(
        is_root(),
        "the end-to-end tests need root (network namespaces, cgroups, BPF): run `sudo -E cargo xtask test`"
    );
    let root = workspace_root();
    // Build the daemon the suites run (and the test binaries) up front;
    // cargo says where the binaries went.
    let native = crate::build::cargo_build_all(&["--workspace", "--all-targets"])?;
    let bins = crate::build::bed_binaries(false)?;
    // The package of the binary under test (the release package holds the
    // same files, from a release build).
    let deb = crate::package::build("dev")?;
    let rpm = crate::package::build_rpm("dev")?;

    println!("== unit tests");
    let mut unit = Command::new("cargo");
    unit.current_dir(&root)
        .args(["test", "--workspace", "--exclude", "metaproxy-tests"]);
    if let Some(f) = filter {
        unit.args(["--", f]);
    }
    run_cmd(&mut unit)?;

    println!("== arm64: the daemon cross-built, its unit tests under qemu-aarch64");
    let arm64 = crate::arm64::build()?;
    crate::arm64::test()?;

    println!("== kernel and end-to-end tests");
    crate::clean::run_with(&bins.metaproxy)?;
    let mut e2e = Command::new("cargo");
    e2e.current_dir(&root)
        .args([
            "test",
            "-p",
            "metaproxy-tests",
            "--no-fail-fast",
            "--",
            "--test-threads=1",
        ])
        .env("METAPROXY_BIN", &bins.metaproxy)
        .env("METAPROXY_DEB", &deb)
        .env("METAPROXY_RPM", &rpm)
        .env("METAPROXY_ARM64_BIN", &arm64.metaproxy)
        .env("METAPROXY_ARM64_PROBE", &arm64.probe)
        .env("METAPROXY_PROBE", native.probe_object()?)
        .env("MP_BIN_DIR", &bins.dir);
    if let Some(f) = filter {
        e2e.arg(f);
    }
    run_cmd(&mut e2e)
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}
