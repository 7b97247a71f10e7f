//! `cargo xtask package`: the Debian package, built with cargo-deb from
//! `[package.metadata.deb]` in metaproxy/Cargo.toml: the binary, the unit
//! and its drop-ins, a commented /etc/default/metaproxy and the README.
//! Installing it enables the unit.

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

pub fn run(profile: &str) -> anyhow::Result<()> {
    let deb = build(profile)?;
    println!("{}", deb.display());
    Ok(())
}
