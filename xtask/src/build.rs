//! Builds through cargo and asks it where the binaries went
//! (`--message-format=json`), so nothing guesses `target/` paths and
//! `CARGO_TARGET_DIR` just works.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::Context as _;
use metaproxy_tests::Binaries;

use crate::workspace_root;

/// Runs `cargo build <args>` and returns the binaries it built, by name.
pub fn cargo_build(args: &[&str]) -> anyhow::Result<HashMap<String, PathBuf>> {
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .arg("build")
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo build")?;
    let mut bins = HashMap::new();
    let stdout = child.stdout.take().context("cargo's stdout")?;
    for line in BufReader::new(stdout).lines() {
        let msg: serde_json::Value = match serde_json::from_str(&line?) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let is_bin = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "bin"));
        if let (true, Some(name), Some(exe)) = (
            is_bin,
            msg["target"]["name"].as_str(),
            msg["executable"].as_str(),
        ) {
            bins.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    let status = child.wait()?;
    anyhow::ensure!(
        status.success(),
        "cargo build {} failed: {status}",
        args.join(" ")
    );
    Ok(bins)
}

/// Builds the daemon and the bed's clients (`--release` when asked) and
/// says where they are.
pub fn bed_binaries(release: bool) -> anyhow::Result<Binaries> {
    let mut args = vec!["-p", "metaproxy", "-p", "metaproxy-tests", "--bins"];
    if release {
        args.push("--release");
    }
    let bins = cargo_build(&args)?;
    let metaproxy = bins
        .get("metaproxy")
        .context("cargo built no metaproxy binary")?;
    let client = bins
        .get("mp-client")
        .context("cargo built no mp-client binary")?;
    Ok(Binaries {
        metaproxy: metaproxy.clone(),
        dir: client
            .parent()
            .context("mp-client has no directory")?
            .to_path_buf(),
    })
}
