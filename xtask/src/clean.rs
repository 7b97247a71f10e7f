//! `cargo xtask clean`: remove what a killed test run left behind. The test
//! bed names everything `<prefix>-<pid>-<n>`; entries whose pid is still
//! alive belong to a running test and are left alone. Removing a test cgroup
//! kills what runs in it (daemons, dockerd, moto, containers: all started by
//! the bed), and its twins in the cgroup v1 hierarchies go too.

use std::{fs, path::Path, process::Command};

/// Name prefixes the test bed uses (see metaproxy_tests::unique_name).
const PREFIXES: &[&str] = &["mpt-", "mpd-", "mpdemo-", "mpimds-"];

/// `cargo xtask clean`: finds the daemon binary (for `detach`) through cargo.
pub fn run() -> anyhow::Result<()> {
    let bins = crate::build::cargo_build(&["-p", "metaproxy", "--bin", "metaproxy"])?;
    let metaproxy = bins
        .get("metaproxy")
        .ok_or_else(|| anyhow::anyhow!("cargo built no metaproxy binary"))?;
    run_with(metaproxy)
}

/// Removes what killed runs left, detaching stale pins with `metaproxy`.
pub fn run_with(metaproxy: &Path) -> anyhow::Result<()> {
    let mut removed = Vec::new();
    // Netns and cgroups first: killing a cgroup's processes (ours, by name)
    // stops stray daemons before their pins go.
    let netns = Command::new("ip").args(["netns", "list"]).output()?;
    for name in String::from_utf8_lossy(&netns.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
    {
        if is_stale(name)
            && Command::new("ip")
                .args(["netns", "del", name])
                .status()?
                .success()
        {
            removed.push(format!("netns {name}"));
        }
    }
    if let Some(cg2) = cgroup2_mount() {
        for dir in stale_entries(&cg2) {
            metaproxy_tests::cgroup::remove_tree(&dir);
            removed.push(format!("cgroup {}", dir.display()));
        }
        for hierarchy in metaproxy_tests::cgroup::v1_hierarchies() {
            for dir in stale_entries(&hierarchy) {
                metaproxy_tests::cgroup::remove_tree(&dir);
            }
        }
    }
    for dir in stale_entries(Path::new("/sys/fs/bpf")) {
        let _ = Command::new(metaproxy)
            .arg("detach")
            .arg("--pin-dir")
            .arg(&dir)
            .status();
        let _ = fs::remove_dir_all(&dir);
        removed.push(format!("pins {}", dir.display()));
    }
    for dir in stale_entries(&std::env::temp_dir()) {
        // A killed dockerd leaves its overlay mounts behind.
        metaproxy_tests::docker::unmount_below(&dir);
        let _ = fs::remove_dir_all(&dir);
        removed.push(format!("scratch {}", dir.display()));
    }
    for r in &removed {
        // stderr: `cargo xtask bench --json` keeps stdout for its report.
        eprintln!("clean: removed {r}");
    }
    Ok(())
}

/// `<prefix>-<pid>-<n>` with a pid that is no longer running.
fn is_stale(name: &str) -> bool {
    let Some(rest) = PREFIXES.iter().find_map(|p| name.strip_prefix(p)) else {
        return false;
    };
    let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    !Path::new(&format!("/proc/{pid}")).exists()
}

fn stale_entries(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(is_stale))
        .map(|e| e.path())
        .collect()
}

fn cgroup2_mount() -> Option<std::path::PathBuf> {
    metaproxy_tests::cgroup::cgroup2_mount().ok()
}
