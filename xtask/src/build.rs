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
    Ok(cargo_build_all(args)?.bins)
}

/// What a `cargo build` made.
pub struct Built {
    /// Binaries, by name.
    pub bins: HashMap<String, PathBuf>,
    /// Build scripts' `OUT_DIR`s, by the name of the workspace package
    /// they belong to.
    pub out_dirs: HashMap<String, PathBuf>,
    /// Test executables (`--all-targets` or `--tests`), in the order cargo
    /// finished them: (workspace package, target name, executable).
    pub tests: Vec<(String, String, PathBuf)>,
}

impl Built {
    /// The daemon and the bed's clients, from this build.
    pub fn binaries(&self) -> anyhow::Result<Binaries> {
        binaries_of(&self.bins)
    }

    /// A workspace package's test executables, by target name, sorted
    /// as `cargo test` runs them (the library's first, then by name).
    pub fn tests_of(&self, package: &str) -> Vec<(String, PathBuf)> {
        let mut tests: Vec<(String, PathBuf)> = self
            .tests
            .iter()
            .filter(|(p, _, _)| p == package)
            .map(|(_, name, exe)| (name.clone(), exe.clone()))
            .collect();
        let lib = package.replace('-', "_");
        tests.sort_by_key(|(name, _)| (*name != lib, name.clone()));
        tests.dedup();
        tests
    }

    /// The kernel programs' object the daemon embeds (metaproxy's build
    /// script writes it to its `OUT_DIR`).
    pub fn probe_object(&self) -> anyhow::Result<PathBuf> {
        Ok(self
            .out_dirs
            .get("metaproxy")
            .context("cargo ran no metaproxy build script")?
            .join("metaproxy-probe"))
    }
}

/// The workspace package a cargo package id names: `path+file:///w/tests#metaproxy-tests@0.1.0`,
/// or `path+file:///w/metaproxy#0.1.0` where the directory is the name.
fn workspace_package(id: &str) -> Option<&str> {
    let (path, rest) = id.strip_prefix("path+file://")?.split_once('#')?;
    match rest.split_once('@') {
        Some((name, _)) => Some(name),
        None => path.rsplit('/').next(),
    }
}

/// Runs `cargo build <args>` and returns what it built.
pub fn cargo_build_all(args: &[&str]) -> anyhow::Result<Built> {
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .arg("build")
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo build")?;
    let mut bins = HashMap::new();
    let mut out_dirs = HashMap::new();
    let mut tests = Vec::new();
    let stdout = child.stdout.take().context("cargo's stdout")?;
    for line in BufReader::new(stdout).lines() {
        let msg: serde_json::Value = match serde_json::from_str(&line?) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if msg["reason"] == "build-script-executed" {
            let package = msg["package_id"].as_str().and_then(workspace_package);
            if let (Some(package), Some(dir)) = (package, msg["out_dir"].as_str()) {
                out_dirs.insert(package.to_string(), PathBuf::from(dir));
            }
            continue;
        }
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        if msg["profile"]["test"] == true {
            let package = msg["package_id"].as_str().and_then(workspace_package);
            if let (Some(package), Some(name), Some(exe)) = (
                package,
                msg["target"]["name"].as_str(),
                msg["executable"].as_str(),
            ) {
                tests.push((package.to_string(), name.to_string(), PathBuf::from(exe)));
            }
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
    Ok(Built {
        bins,
        out_dirs,
        tests,
    })
}

/// Builds the daemon and the bed's clients (`--release` when asked) and
/// says where they are.
pub fn bed_binaries(release: bool) -> anyhow::Result<Binaries> {
    let mut args = vec!["-p", "metaproxy", "-p", "metaproxy-tests", "--bins"];
    if release {
        args.push("--release");
    }
    binaries_of(&cargo_build(&args)?)
}

fn binaries_of(bins: &HashMap<String, PathBuf>) -> anyhow::Result<Binaries> {
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

#[cfg(test)]
mod tests {
    use super::workspace_package;

    #[test]
    fn package_ids_name_their_package() {
        assert_eq!(
            workspace_package("path+file:///w/tests#metaproxy-tests@0.1.0"),
            Some("metaproxy-tests")
        );
        assert_eq!(
            workspace_package("path+file:///w/metaproxy#0.1.0"),
            Some("metaproxy")
        );
        assert_eq!(
            workspace_package("registry+https://github.com/rust-lang/crates.io-index#tokio@1.0.0"),
            None
        );
    }
}
