//! cgroup v2 subtrees for tests, removed (with any process left in them)
//! on drop.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use metaproxy_common::mountinfo;

/// Where cgroup2 is mounted, read as the daemon reads it.
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo::cgroup2_mount(&text).context("no cgroup2 mount")
}

/// A test-owned cgroup directory under the cgroup2 root.
#[derive(Debug)]
pub struct TestCgroup {
    root: PathBuf,
    mount: PathBuf,
}

impl TestCgroup {
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let mount = cgroup2_mount()?;
        let root = mount.join(crate::unique_name(prefix));
        fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))?;
        Ok(Self { root, mount })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The path below the cgroup2 mount, as /proc/PID/cgroup shows it.
    pub fn relative(&self, dir: &Path) -> String {
        format!(
            "/{}",
            dir.strip_prefix(&self.mount).unwrap_or(dir).display()
        )
    }

    /// Creates (if needed) and returns the child `rel`, e.g. `attached/a`.
    pub fn child(&self, rel: &str) -> anyhow::Result<PathBuf> {
        let dir = self.root.join(rel);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }
}

/// The cgroup id the kernel reports for `dir` (its inode number).
pub fn id_of(dir: &Path) -> u64 {
    fs::metadata(dir).map(|m| m.ino()).unwrap_or(0)
}

/// The cgroup with id `id` at or below `dir`, if it is still there.
pub fn path_of(dir: &Path, id: u64) -> Option<PathBuf> {
    if id_of(dir) == id {
        return Some(dir.to_path_buf());
    }
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| path_of(&e.path(), id))
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let mut left = Vec::new();
        if !remove_tree(&self.root) {
            left.push(self.root.clone());
        }
        // dockerd --cgroup-parent also creates the parent in every cgroup v1
        // hierarchy (/sys/fs/cgroup/cpu/<name>, ...): those are ours too.
        if let Some(name) = self.root.file_name() {
            for hierarchy in v1_hierarchies() {
                if !remove_tree(&hierarchy.join(name)) {
                    left.push(hierarchy.join(name));
                }
            }
        }
        if !left.is_empty() {
            crate::teardown_failed(format!("cgroups left behind: {left:?}"));
        }
    }
}

/// The cgroup v1 hierarchies mounted on this host (none on pure v2 hosts).
pub fn v1_hierarchies() -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|text| mountinfo::cgroup1_mounts(&text))
        .unwrap_or_default()
}

/// Kills what is left in `dir` (processes our tests started), then removes
/// the directories bottom-up. `false` if something could not be removed.
pub fn remove_tree(dir: &Path) -> bool {
    if !dir.exists() {
        return true;
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    // cgroup.kill ends every process in this cgroup, which our test created
    // (v1 hierarchies have no cgroup.kill; their processes are gone with v2's).
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..100 {
        if fs::remove_dir(dir).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
