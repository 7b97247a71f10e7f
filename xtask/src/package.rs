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
/// already have, which holds the same files).
pub fn build(profile: &str) -> anyhow::Result<PathBuf> {
    crate::setup::cargo_deb()?;
    let out = workspace_root().join("target/debian");
    let output = Command::new("cargo")
        .current_dir(workspace_root())
        .args(["deb", "-p", "metaproxy", "--profile", profile, "--output"])
        .arg(&out)
        .output()
        .context("running cargo deb")?;
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
    let mut rpms: Vec<PathBuf> = std::fs::read_dir(&out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "rpm"))
        .collect();
    rpms.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    rpms.pop().context("cargo generate-rpm wrote no package")
}

pub fn run(profile: &str) -> anyhow::Result<()> {
    let deb = build(profile)?;
    println!("{}", deb.display());
    let rpm = build_rpm(profile)?;
    println!("{}", rpm.display());
    Ok(())
}
