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
    // One build for everything below: the daemon, the bed's clients and
    // every test executable. Cargo resolves features by the packages it is
    // asked for, so each `cargo test -p ...` would build much of the tree
    // again; the root suites run from this build's executables instead.
    let native = crate::build::cargo_build_all(&["--workspace", "--all-targets"])?;
    let bins = native.binaries()?;
    // The package of the binary under test (the release package holds the
    // same files, from a release build).
    let deb = crate::package::build("dev", false)?;
    let rpm = crate::package::build_rpm("dev")?;

    println!("== unit tests");
    // The same packages as the build above (everything but the root
    // suites), so nothing is built again.
    let mut unit = Command::new("cargo");
    unit.current_dir(&root)
        .args(["test", "--workspace", "--exclude", "metaproxy-tests"]);
    if let Some(f) = filter {
        unit.args(["--", f]);
    }
    run_cmd(&mut unit)?;

    println!("== arm64: the daemon cross-built, its unit tests under qemu-aarch64");
    let arm64 = crate::arm64::build_with_tests()?;
    crate::arm64::test()?;

    println!("== kernel and end-to-end tests");
    crate::clean::run_with(&bins.metaproxy)?;
    let suites = native.tests_of("metaproxy-tests");
    anyhow::ensure!(!suites.is_empty(), "cargo built no metaproxy-tests suites");
    let mut failed = Vec::new();
    for (name, exe) in &suites {
        println!("== suite {name}");
        let mut suite = Command::new(exe);
        suite
            .current_dir(root.join("tests"))
            .arg("--test-threads=1")
            .env("METAPROXY_BIN", &bins.metaproxy)
            .env("METAPROXY_DEB", &deb)
            .env("METAPROXY_RPM", &rpm)
            .env("METAPROXY_ARM64_BIN", &arm64.metaproxy)
            .env("METAPROXY_ARM64_PROBE", &arm64.probe)
            .env("METAPROXY_PROBE", native.probe_object()?)
            .env("MP_BIN_DIR", &bins.dir);
        if let Some(f) = filter {
            suite.arg(f);
        }
        // Every suite runs, as `cargo test --no-fail-fast` would.
        if let Err(e) = run_cmd(&mut suite) {
            eprintln!("suite {name} failed: {e:#}");
            failed.push(name.clone());
        }
    }
    anyhow::ensure!(failed.is_empty(), "suites failed: {}", failed.join(", "));
    Ok(())
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}
