//! `cargo xtask package`: the Debian package (cargo-deb, from
//! `[package.metadata.deb]` in metaproxy/Cargo.toml) and the RPM package
//! for Amazon Linux 2023 and other RPM distributions (cargo-generate-rpm,
//! from `[package.metadata.generate-rpm]`): the binary, the unit and its
//! drop-ins, the commented settings (/etc/default/metaproxy in the .deb,
//! /etc/sysconfig/metaproxy in the .rpm) and the docs. Installing either
//! enables the unit.

use std::{path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::workspace_root;

/// Builds the .deb and returns its path. `profile` is a cargo profile
/// (`release` for a real package; the tests package the `dev` build they
/// already have, which holds the same files). `build` false packages the
/// binary that profile already built, as it is.
pub fn build(profile: &str, build: bool) -> anyhow::Result<PathBuf> {
    crate::setup::cargo_deb()?;
    let out = workspace_root().join("target/debian");
    let mut deb = Command::new("cargo");
    deb.current_dir(workspace_root())
        .args(["deb", "-p", "metaproxy", "--profile", profile, "--output"])
        .arg(&out);
    if !build {
        deb.arg("--no-build");
    }
    let output = deb.output().context("running cargo deb")?;
    anyhow::ensure!(
        output.status.success(),
        "cargo deb failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // cargo-deb prints the package's path last.
    let printed = String::from_utf8_lossy(&output.stdout);
    let deb = printed
        .lines()
        .map(str::trim)
        .rfind(|l| l.ends_with(".deb"))
        .context("cargo deb printed no package path")?;
    // Relative to the workspace root, where cargo deb ran.
    Ok(workspace_root().join(deb))
}

/// Builds the .rpm from the binary `profile` built, and returns its path.
pub fn build_rpm(profile: &str) -> anyhow::Result<PathBuf> {
    crate::setup::cargo_generate_rpm()?;
    let out = workspace_root().join("target/generate-rpm");
    // A directory (the trailing slash says so): the package is named by
    // its name, version, release and architecture inside it.
    std::fs::create_dir_all(&out)?;
    let output = Command::new("cargo")
        .current_dir(workspace_root())
        .args([
            "generate-rpm",
            "-p",
            "metaproxy",
            "--profile",
            profile,
            "-o",
        ])
        .arg(format!("{}/", out.display()))
        .output()
        .context("running cargo generate-rpm")?;
    anyhow::ensure!(
        output.status.success(),
        "cargo generate-rpm failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    newest_rpm(&out, "x86_64")
}

/// The newest `*.<arch>.rpm` in `dir`.
fn newest_rpm(dir: &std::path::Path, arch: &str) -> anyhow::Result<PathBuf> {
    let suffix = format!(".{arch}.rpm");
    let mut rpms: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(&suffix))
        .collect();
    rpms.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    rpms.pop()
        .with_context(|| format!("cargo generate-rpm wrote no {suffix} package"))
}

/// The arm64 .deb and .rpm, from the one release build.
pub fn build_arm64() -> anyhow::Result<(PathBuf, PathBuf)> {
    crate::arm64::build()?;
    crate::setup::cargo_deb()?;
    crate::setup::cargo_generate_rpm()?;
    let target = crate::arm64::TARGET;
    let deb_dir = workspace_root().join("target/debian");
    let output = Command::new("cargo")
        .current_dir(workspace_root())
        .args([
            "deb",
            "-p",
            "metaproxy",
            "--no-build",
            "--target",
            target,
            "--output",
        ])
        .arg(&deb_dir)
        .output()
        .context("running cargo deb")?;
    anyhow::ensure!(
        output.status.success(),
        "cargo deb --target {target} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    let deb = printed
        .lines()
        .map(str::trim)
        .rfind(|l| l.ends_with(".deb"))
        .context("cargo deb printed no package path")?;
    let rpm_dir = workspace_root().join("target/generate-rpm");
    std::fs::create_dir_all(&rpm_dir)?;
    let output = Command::new("cargo")
        .current_dir(workspace_root())
        .args(["generate-rpm", "-p", "metaproxy", "--target", target, "-o"])
        .arg(format!("{}/", rpm_dir.display()))
        .output()
        .context("running cargo generate-rpm")?;
    anyhow::ensure!(
        output.status.success(),
        "cargo generate-rpm --target {target} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((workspace_root().join(deb), newest_rpm(&rpm_dir, "aarch64")?))
}

pub fn run(profile: &str, target: Option<&str>) -> anyhow::Result<()> {
    let native = "x86_64-unknown-linux-gnu";
    anyhow::ensure!(
        target.is_none_or(|t| t == native || t == crate::arm64::TARGET),
        "--target: {native} or {}",
        crate::arm64::TARGET
    );
    if target.is_none_or(|t| t == native) {
        println!("{}", build(profile, true)?.display());
        println!("{}", build_rpm(profile)?.display());
    }
    if target.is_none_or(|t| t == crate::arm64::TARGET) {
        let (deb, rpm) = build_arm64()?;
        println!("{}", deb.display());
        println!("{}", rpm.display());
    }
    Ok(())
}
