//! `cargo xtask fuzz`: a short libFuzzer pass over each target in `fuzz/`
//! (cargo-fuzz, nightly). New inputs go to a scratch corpus that is removed
//! afterwards; the committed seeds in `fuzz/corpus/<target>` are only read.
//! A crash fails the run, naming the target; libFuzzer leaves the input in
//! `fuzz/artifacts/<target>/`.

use std::process::Command;

use anyhow::Context as _;

use crate::{run_cmd, succeeds, workspace_root};

/// The targets in fuzz/Cargo.toml.
const TARGETS: [&str; 4] = ["router", "token", "policy_env", "cgroup_path"];

pub fn run(seconds: u64, target: Option<&str>) -> anyhow::Result<()> {
    let targets: Vec<&str> = match target {
        Some(t) => {
            anyhow::ensure!(
                TARGETS.contains(&t),
                "no fuzz target {t:?} (targets: {})",
                TARGETS.join(", ")
            );
            vec![t]
        }
        None => TARGETS.to_vec(),
    };
    if !succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        println!("== installing cargo-fuzz");
        run_cmd(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let root = workspace_root();
    for target in targets {
        println!("== fuzz {target} ({seconds} s)");
        let scratch =
            std::env::temp_dir().join(format!("metaproxy-fuzz-{target}-{}", std::process::id()));
        // Left over from an earlier run with the same pid: start empty.
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        let seeds = root.join("fuzz/corpus").join(target);
        let result = run_cmd(
            Command::new("cargo")
                .current_dir(&root)
                .args(["+nightly", "fuzz", "run", target])
                .arg(&scratch)
                .arg(&seeds)
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                // The fuzz build takes sanitizer flags the BPF build cannot:
                // the library is all the targets need (see metaproxy/build.rs).
                .env("METAPROXY_SKIP_EBPF", "1"),
        );
        let _ = std::fs::remove_dir_all(&scratch);
        result.with_context(|| {
            format!("fuzz target {target} failed (its input is in fuzz/artifacts/{target}/)")
        })?;
    }
    Ok(())
}
