//! The arm64 (Graviton) build: the daemon cross-compiled with Debian's
//! aarch64 gcc (the linker and qemu runner are in `.cargo/config.toml`),
//! run under `qemu-aarch64`. The kernel programs are `bpfel`, the same
//! object for both architectures: the build embeds the very bytes the
//! native build does, which the tests check.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::{build::cargo_build_all, run_cmd, workspace_root};

pub const TARGET: &str = "aarch64-unknown-linux-gnu";

/// The arm64 daemon and the kernel object it embeds.
pub struct Arm64 {
    pub metaproxy: PathBuf,
    pub probe: PathBuf,
}

/// Builds the daemon for arm64, in release: the one build the packages
/// are made of.
pub fn build() -> anyhow::Result<Arm64> {
    build_targets(&["--bin", "metaproxy"])
}

/// Builds the daemon and the crate's tests for arm64, in release: the
/// one build the packaging suite and [`test`] share (a daemon built
/// without its tests would resolve features differently, and `cargo
/// test` would build the whole tree again).
pub fn build_with_tests() -> anyhow::Result<Arm64> {
    build_targets(&["--lib", "--bins", "--tests"])
}

fn build_targets(targets: &[&str]) -> anyhow::Result<Arm64> {
    crate::setup::cross()?;
    let mut args = vec!["-p", "metaproxy", "--release", "--target", TARGET];
    args.extend_from_slice(targets);
    let built = cargo_build_all(&args)?;
    Ok(Arm64 {
        metaproxy: built
            .bins
            .get("metaproxy")
            .context("cargo built no arm64 metaproxy")?
            .clone(),
        probe: built.probe_object()?,
    })
}

/// The daemon crate's in-process suites and unit tests, built for arm64
/// in release (on the dependencies [`build`] made) and run under qemu.
pub fn test() -> anyhow::Result<()> {
    run_cmd(
        std::process::Command::new("cargo")
            .current_dir(workspace_root())
            .args([
                "test",
                "-p",
                "metaproxy",
                "--release",
                "--target",
                TARGET,
                "--lib",
                "--bins",
                "--tests",
            ]),
    )
}
